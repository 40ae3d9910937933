"""The `cpu` target: the lowered graph rendered as torch ops; it has no GPU architecture.

Its tile table holds small tiles for running the same Triton kernels under TRITON_INTERPRET=1
(verification on machines without a GPU): small enough that test shapes span several tiles
and hit the masked edges, large enough that the interpreter stays fast.
"""

from kiln.codegen.targets._base import Target
from kiln.codegen.targets._tiles import attention_tiles, gemm_tiles, moe_tiles, row_tiles

TARGET = Target(
    name="cpu",
    backend=None,
    arch=None,
    sm_count=None,
    shared_mem_per_sm=None,
    shared_mem_per_block=None,
    hbm_bandwidth_gbs=None,
    peak_bf16_tflops=None,
    warp_size=1,
    accumulator_values_per_thread=None,
    tile_table={
        "gemm": gemm_tiles(decode=(16, 32, 32, 4, 1), small=(32, 32, 32, 4, 1), large=(32, 32, 32, 4, 1)),
        "moe": moe_tiles(decode=(16, 32, 32, 4, 1), small=(16, 32, 32, 4, 1), large=(32, 32, 32, 4, 1)),
        **row_tiles(narrow=4, medium=4, wide=4, tiled_block_n=32, tiled_warps=4),
        **attention_tiles(prefill=((16, 16, 4, 1),) * 3, decode=((16, 4, 1),) * 3),
    },
)
