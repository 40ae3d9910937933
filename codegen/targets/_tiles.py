"""Helpers that build tile tables, so each target module states its numbers and nothing else.

Kinds and their buckets (each kernel module documents its block names and how it picks a bucket):
  gemm:        decode (M <= 16), small (M <= 128), large; blocks BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
  rows:        narrow (a padded row <= 1024 values), medium (<= 4096), wide: the warps of a
               program that holds a whole row (the block is the row itself)
  rows_tiled:  default; block BLOCK_N (columns per program of a wide elementwise row)
  moe:         decode (T <= 16), small (T <= 256), large; blocks BLOCK_M, BLOCK_N, BLOCK_K of the
               grouped GEMMs (BLOCK_M also pads each expert's rows in the alignment)
  attention_prefill: d64, d128, d256 (head_dim buckets); blocks BLOCK_M, BLOCK_N
  attention_decode:  d64, d128, d256; block BLOCK_N
"""

from kiln.codegen.targets._base import TileConfig

HEAD_DIM_BUCKETS = ("d64", "d128", "d256")


def row_tiles(narrow: int, medium: int, wide: int, tiled_block_n: int, tiled_warps: int) -> dict:
    """The rows table (warps per bucket) and the rows_tiled table (BLOCK_N and warps)."""
    return {
        "rows": {bucket: TileConfig({}, num_warps=warps)
                 for bucket, warps in zip(("narrow", "medium", "wide"), (narrow, medium, wide))},
        "rows_tiled": {"default": TileConfig({"BLOCK_N": tiled_block_n}, num_warps=tiled_warps)},
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


def attention_tiles(prefill: tuple, decode: tuple) -> dict:
    """Both attention tables: per head_dim bucket, prefill (BLOCK_M, BLOCK_N, num_warps,
    num_stages) and decode (BLOCK_N, num_warps, num_stages), given in HEAD_DIM_BUCKETS order."""
    return {
        "attention_prefill": {bucket: TileConfig({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                              for bucket, (m, n, w, s) in zip(HEAD_DIM_BUCKETS, prefill, strict=True)},
        "attention_decode": {bucket: TileConfig({"BLOCK_N": n}, num_warps=w, num_stages=s)
                             for bucket, (n, w, s) in zip(HEAD_DIM_BUCKETS, decode, strict=True)},
    }


# NVIDIA tables shared by several records (a record may also state its own).
NVIDIA_ROWS = row_tiles(narrow=4, medium=8, wide=16, tiled_block_n=1024, tiled_warps=4)
NVIDIA_DECODE = ((64, 4, 3), (64, 4, 3), (64, 8, 3))
# Ampere/Ada/consumer Blackwell (mma.sync, <= 99 KB shared per block) and Hopper/Blackwell
# datacenter parts: the bf16 prefill kernel compiles without spills (test_attention_aot.py).
SMALL_SMEM_ATTENTION = attention_tiles(prefill=((64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 8, 2)), decode=NVIDIA_DECODE)
LARGE_SMEM_ATTENTION = attention_tiles(prefill=((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 2)), decode=NVIDIA_DECODE)
HOPPER_GEMM = gemm_tiles(decode=(16, 64, 128, 4, 5), small=(64, 128, 64, 4, 4), large=(128, 256, 64, 8, 3))
HOPPER_MOE = moe_tiles(decode=(16, 64, 128, 4, 4), small=(32, 64, 128, 4, 4), large=(64, 128, 64, 4, 4))
