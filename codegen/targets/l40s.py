"""NVIDIA L40S (sm_89): 142 SMs, 100 KB shared/SM, 864 GB/s GDDR6, 362 TFLOPs bf16.

Its small shared memory (99 KB per block) asks for shallower pipelines than the A100's.
"""

from kiln.codegen.targets._base import Target
from kiln.codegen.targets._tiles import NVIDIA_ROWS, SMALL_SMEM_ATTENTION, gemm_tiles, moe_tiles

TARGET = Target(
    name="l40s",
    backend="cuda",
    arch=89,
    sm_count=142,
    shared_mem_per_sm=100 * 1024,
    shared_mem_per_block=99 * 1024,
    hbm_bandwidth_gbs=864.0,
    peak_bf16_tflops=362.05,
    warp_size=32,
    fp8=True,
    accumulator_values_per_thread=64,
    tile_table={
        "gemm": gemm_tiles(decode=(16, 64, 128, 4, 3), small=(64, 128, 64, 4, 3), large=(128, 128, 32, 8, 4)),
        "moe": moe_tiles(decode=(16, 64, 128, 4, 3), small=(32, 64, 64, 4, 3), large=(64, 128, 32, 8, 3)),
        **NVIDIA_ROWS,
        **SMALL_SMEM_ATTENTION,
    },
)
