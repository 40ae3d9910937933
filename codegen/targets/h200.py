"""NVIDIA H200 SXM 141 GB (sm_90a): the H100's chip with 4,800 GB/s HBM3e; same tiles as h100."""

from kiln.codegen.targets.base import Target
from kiln.codegen.targets.h100 import HOPPER_GEMM, HOPPER_MOE
from kiln.codegen.targets.tiles import gpu_tile_table
from kiln.contract import TARGET_ARCHS

H200 = Target(
    name="h200",
    arch=TARGET_ARCHS["h200"],
    sm_count=132,
    shared_mem_per_sm=228 * 1024,
    shared_mem_per_block=227 * 1024,
    hbm_bandwidth_gbs=4800.0,
    peak_bf16_tflops=989.4,
    warp_size=32,
    accumulator_values_per_thread=128,
    tile_table=gpu_tile_table(HOPPER_GEMM, HOPPER_MOE),
)
