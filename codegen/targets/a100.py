"""NVIDIA A100 SXM4 80 GB (sm_80): 108 SMs, 164 KB shared/SM, 2,039 GB/s HBM2e, 312 TFLOPs bf16."""

from kiln.codegen.targets._base import Target
from kiln.codegen.targets._tiles import NVIDIA_ROWS, SMALL_SMEM_ATTENTION, gemm_tiles, moe_tiles

TARGET = Target(
    name="a100",
    backend="cuda",
    arch=80,
    sm_count=108,
    shared_mem_per_sm=164 * 1024,
    shared_mem_per_block=163 * 1024,
    hbm_bandwidth_gbs=2039.0,
    peak_bf16_tflops=312.0,
    warp_size=32,
    accumulator_values_per_thread=64,
    tile_table={
        "gemm": gemm_tiles(decode=(16, 64, 128, 4, 4), small=(64, 128, 64, 4, 4), large=(128, 128, 64, 8, 3)),
        "moe": moe_tiles(decode=(16, 64, 128, 4, 4), small=(32, 64, 64, 4, 4), large=(64, 128, 64, 8, 3)),
        **NVIDIA_ROWS,
        **SMALL_SMEM_ATTENTION,
    },
)
