"""NVIDIA H100 SXM5 80 GB (sm_90a): 132 SMs, 228 KB shared/SM, 3,350 GB/s HBM3, 989 TFLOPs bf16."""

from kiln.codegen.targets._base import Target
from kiln.codegen.targets._tiles import HOPPER_GEMM, HOPPER_MOE, LARGE_SMEM_ATTENTION, NVIDIA_ROWS

TARGET = Target(
    name="h100",
    backend="cuda",
    arch=90,
    sm_count=132,
    shared_mem_per_sm=228 * 1024,
    shared_mem_per_block=227 * 1024,
    hbm_bandwidth_gbs=3350.0,
    peak_bf16_tflops=989.4,
    warp_size=32,
    fp8=True,
    accumulator_values_per_thread=128,
    tile_table={"gemm": HOPPER_GEMM, "moe": HOPPER_MOE, **NVIDIA_ROWS, **LARGE_SMEM_ATTENTION},
)
