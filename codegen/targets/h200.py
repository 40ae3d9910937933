"""NVIDIA H200 SXM 141 GB (sm_90a): the H100's chip (132 SMs, 228 KB shared/SM) with 4,800 GB/s
HBM3e; its own record, so artifacts and reports name it, with the Hopper tiles."""

from kiln.codegen.targets._base import Target
from kiln.codegen.targets._tiles import HOPPER_GEMM, HOPPER_MOE, LARGE_SMEM_ATTENTION, NVIDIA_ROWS

TARGET = Target(
    name="h200",
    backend="cuda",
    arch=90,
    sm_count=132,
    shared_mem_per_sm=228 * 1024,
    shared_mem_per_block=227 * 1024,
    hbm_bandwidth_gbs=4800.0,
    peak_bf16_tflops=989.4,
    warp_size=32,
    fp8=True,
    accumulator_values_per_thread=128,
    tile_table={"gemm": HOPPER_GEMM, "moe": HOPPER_MOE, **NVIDIA_ROWS, **LARGE_SMEM_ATTENTION},
)
