"""AMD Instinct MI300X (CDNA3, gfx942): 304 CUs, 64 KB LDS per CU, wavefronts of 64 lanes,
5,300 GB/s HBM3, 1,307 TFLOPs bf16 dense.

Triton's HIP backend cross-compiles to an hsaco without a GPU; its AMD stream pipeliner wants
num_stages 2 for GEMM loops, and a workgroup holds at most 1,024 lanes (16 wavefronts). Warps
here are wavefronts, twice as wide as NVIDIA's, so the row kernels take half the warps.
MFMA accumulators live in the 512 unified VGPR/AGPR registers a lane has at one wave per SIMD.
"""

from kiln.codegen.targets._base import Target
from kiln.codegen.targets._tiles import attention_tiles, gemm_tiles, moe_tiles, row_tiles

TARGET = Target(
    name="mi300x",
    backend="hip",
    arch="gfx942",
    sm_count=304,
    shared_mem_per_sm=64 * 1024,
    shared_mem_per_block=64 * 1024,
    hbm_bandwidth_gbs=5300.0,
    peak_bf16_tflops=1307.4,
    warp_size=64,
    accumulator_values_per_thread=128,
    tile_table={
        "gemm": gemm_tiles(decode=(16, 64, 128, 4, 2), small=(64, 128, 64, 4, 2), large=(128, 128, 64, 8, 2)),
        "moe": moe_tiles(decode=(16, 64, 128, 4, 2), small=(32, 64, 64, 4, 2), large=(64, 128, 64, 4, 2)),
        **row_tiles(narrow=2, medium=4, wide=8, tiled_block_n=1024, tiled_warps=4),
        **attention_tiles(prefill=((128, 64, 4, 1), (128, 64, 4, 1), (64, 64, 4, 1)),
                          decode=((64, 4, 1), (64, 4, 1), (64, 4, 1))),
    },
)
