"""NVIDIA GeForce RTX 5090 (consumer Blackwell, sm_120a): 170 SMs, 100 KB shared/SM (99 KB per
block), 1,792 GB/s GDDR7, 209.5 TFLOPs bf16 dense with fp32 accumulation.

sm_120 has neither wgmma nor tcgen05 nor TMA multicast: Triton lowers tl.dot to mma.sync, which
holds operand fragments in registers (accumulator budget as on Ampere), and its shared memory is
the L40S's, so it takes the L40S's shallower GEMM pipelines.
"""

from kiln.codegen.targets._base import Target
from kiln.codegen.targets._tiles import NVIDIA_ROWS, attention_tiles, gemm_tiles, moe_tiles

TARGET = Target(
    name="rtx5090",
    backend="cuda",
    arch=120,
    sm_count=170,
    shared_mem_per_sm=100 * 1024,
    shared_mem_per_block=99 * 1024,
    hbm_bandwidth_gbs=1792.0,
    peak_bf16_tflops=209.5,
    warp_size=32,
    fp8=True,
    accumulator_values_per_thread=64,
    tile_table={
        "gemm": gemm_tiles(decode=(16, 64, 128, 4, 3), small=(64, 128, 64, 4, 3), large=(128, 128, 32, 8, 4)),
        "moe": moe_tiles(decode=(16, 64, 128, 4, 3), small=(32, 64, 64, 4, 3), large=(64, 128, 32, 8, 3)),
        **NVIDIA_ROWS,
        # the L40S's prefill tiles; decode d64 at two stages (three spilled on sm_120, d128 the reverse)
        **attention_tiles(prefill=((64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 8, 2)),
                          decode=((64, 4, 2), (64, 4, 3), (64, 8, 3))),
    },
)
