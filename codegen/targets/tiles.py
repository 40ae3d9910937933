"""Tile tables shared by several targets, so each target module states only what differs.

Kinds and their buckets (each kernel module documents its block names and how it picks a bucket):
  gemm:        decode (M <= 16), small (M <= 128), large; blocks BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
  rows:        narrow (a padded row <= 1024 values), medium (<= 4096), wide: the warps of a
               program that holds a whole row (the block is the row itself)
  rows_tiled:  default; block BLOCK_N (columns per program of a wide elementwise row)
  moe:         decode (T <= 16), small (T <= 256), large; blocks BLOCK_M, BLOCK_N, BLOCK_K of the
               grouped GEMMs (BLOCK_M also pads each expert's rows in the alignment)
"""

from kiln.codegen.targets.base import TileConfig

GPU_ROW_KERNEL_TILES = {
    "rows": {
        "narrow": TileConfig({}, num_warps=4),
        "medium": TileConfig({}, num_warps=8),
        "wide": TileConfig({}, num_warps=16),
    },
    "rows_tiled": {"default": TileConfig({"BLOCK_N": 1024}, num_warps=4)},
}


def _bucketed(decode: tuple, small: tuple, large: tuple, **fixed: int) -> dict:
    """A decode/small/large table from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per
    bucket, with the `fixed` blocks in every bucket."""

    def config(spec):
        block_m, block_n, block_k, num_warps, num_stages = spec
        blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, **fixed}
        return TileConfig(blocks, num_warps=num_warps, num_stages=num_stages)

    return {"decode": config(decode), "small": config(small), "large": config(large)}


def gemm_tiles(decode: tuple, small: tuple, large: tuple) -> dict:
    """The gemm table (GROUP_M 8 everywhere)."""
    return _bucketed(decode, small, large, GROUP_M=8)


def moe_tiles(decode: tuple, small: tuple, large: tuple) -> dict:
    """The moe table: the grouped GEMMs' tiles."""
    return _bucketed(decode, small, large)


def gpu_tile_table(gemm: dict, moe: dict) -> dict:
    return {**GPU_ROW_KERNEL_TILES, "gemm": gemm, "moe": moe}
