"""NVIDIA A100 SXM4 80 GB (sm_80): 108 SMs, 164 KB shared/SM, 2,039 GB/s HBM2e, 312 TFLOPs bf16."""

from kiln.codegen.targets.base import Target
from kiln.codegen.targets.tiles import gemm_tiles, gpu_tile_table, moe_tiles
from kiln.contract import TARGET_ARCHS

A100 = Target(
    name="a100",
    arch=TARGET_ARCHS["a100"],
    sm_count=108,
    shared_mem_per_sm=164 * 1024,
    shared_mem_per_block=163 * 1024,
    hbm_bandwidth_gbs=2039.0,
    peak_bf16_tflops=312.0,
    warp_size=32,
    accumulator_values_per_thread=64,
    tile_table=gpu_tile_table(
        gemm_tiles(decode=(16, 64, 128, 4, 4), small=(64, 128, 64, 4, 4), large=(128, 128, 64, 8, 3)),
        moe_tiles(decode=(16, 64, 128, 4, 4), small=(32, 64, 64, 4, 4), large=(64, 128, 64, 8, 3)),
    ),
)
