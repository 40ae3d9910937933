"""Tile tables shared by several targets, so each target module states only what differs.

Kinds and their buckets (each kernel module documents its block names and how it picks a bucket):
  gemm:        decode (M <= 16), small (M <= 128), large; blocks BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
  rms_norm:    narrow (D <= 1024), medium (D <= 4096), wide; block BLOCK_H (rows per program)
  rope:        default; block BLOCK_H (heads per program)
  silu_mul:    default; block BLOCK_N (output columns per program)
  gather_rows: default; block BLOCK_D (columns per program)
"""

from kiln.codegen.targets.base import TileConfig

GPU_ROW_KERNEL_TILES = {
    "rms_norm": {
        "narrow": TileConfig({"BLOCK_H": 8}, num_warps=4),
        "medium": TileConfig({"BLOCK_H": 2}, num_warps=8),
        "wide": TileConfig({"BLOCK_H": 1}, num_warps=16),
    },
    "rope": {"default": TileConfig({"BLOCK_H": 16}, num_warps=4)},
    "silu_mul": {"default": TileConfig({"BLOCK_N": 1024}, num_warps=4)},
    "gather_rows": {"default": TileConfig({"BLOCK_D": 1024}, num_warps=4)},
}


def gemm_tiles(decode: tuple, small: tuple, large: tuple) -> dict:
    """Builds the gemm table from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per bucket."""

    def config(spec):
        block_m, block_n, block_k, num_warps, num_stages = spec
        blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
        return TileConfig(blocks, num_warps=num_warps, num_stages=num_stages)

    return {"decode": config(decode), "small": config(small), "large": config(large)}


def gpu_tile_table(gemm: dict) -> dict:
    return {**GPU_ROW_KERNEL_TILES, "gemm": gemm}
