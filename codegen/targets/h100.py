"""NVIDIA H100 SXM5 80 GB (sm_90a): 132 SMs, 228 KB shared/SM, 3,350 GB/s HBM3, 989 TFLOPs bf16."""

from kiln.codegen.targets.base import Target
from kiln.codegen.targets.tiles import gemm_tiles, gpu_tile_table, moe_tiles
from kiln.contract import TARGET_ARCHS

HOPPER_GEMM = gemm_tiles(decode=(16, 64, 128, 4, 5), small=(64, 128, 64, 4, 4), large=(128, 256, 64, 8, 3))
HOPPER_MOE = moe_tiles(decode=(16, 64, 128, 4, 4), small=(32, 64, 128, 4, 4), large=(64, 128, 64, 4, 4))

H100 = Target(
    name="h100",
    arch=TARGET_ARCHS["h100"],
    sm_count=132,
    shared_mem_per_sm=228 * 1024,
    shared_mem_per_block=227 * 1024,
    hbm_bandwidth_gbs=3350.0,
    peak_bf16_tflops=989.4,
    warp_size=32,
    accumulator_values_per_thread=128,
    tile_table=gpu_tile_table(HOPPER_GEMM, HOPPER_MOE),
)
