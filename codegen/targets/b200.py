"""NVIDIA B200 (sm_100a): 148 SMs, 228 KB shared/SM, 8,000 GB/s HBM3e, 2,250 TFLOPs bf16 dense."""

from kiln.codegen.targets._base import Target
from kiln.codegen.targets._tiles import LARGE_SMEM_ATTENTION, NVIDIA_ROWS, gemm_tiles, moe_tiles

TARGET = Target(
    name="b200",
    backend="cuda",
    arch=100,
    sm_count=148,
    shared_mem_per_sm=228 * 1024,
    shared_mem_per_block=227 * 1024,
    hbm_bandwidth_gbs=8000.0,
    peak_bf16_tflops=2250.0,
    warp_size=32,
    fp8=True,
    accumulator_values_per_thread=128,
    tile_table={
        "gemm": gemm_tiles(decode=(16, 64, 128, 4, 5), small=(64, 128, 64, 4, 4), large=(128, 256, 64, 8, 3)),
        "moe": moe_tiles(decode=(16, 64, 128, 4, 5), small=(32, 64, 128, 4, 4), large=(64, 128, 64, 4, 4)),
        **NVIDIA_ROWS,
        **LARGE_SMEM_ATTENTION,
    },
)
