"""KV tiles the generated GPU decode kernel visits for a block-sparse layout, against dense.

Runs `attention_decode` (one query at position context - 1, one KV head, a GPU target's tiles)
under the Triton interpreter on the CPU and counts its calls of `kv_tile_offsets`, once per KV
tile; the dense kernel is counted the same way. Layout blocks of 64 tokens, KV pages of 16,
densities ~1/2, 1/4, 1/8 (two local blocks, every 2nd/4th/8th block vertical).

    python bench/sparse_tiles.py [--context 8192] [--target h100]
"""

from __future__ import annotations

import argparse

import torch
from sparse_decode import LAYOUTS  # the same layouts the CPU decode timings use

from kiln.ir.specs import BlockSparseLayout


def _count_tiles(attn, context: int, target: str, num_splits: int) -> tuple[int, int]:
    """(KV tiles visited, block_n) by the decode kernel of `attn` for one query at context - 1."""
    from kiln.codegen.kernels import attention_decode
    from kiln.codegen.targets import get_target

    variant = attention_decode.choose(get_target(target), attn, split_k=num_splits > 1)
    module = attention_decode.load(variant)
    pages = -(-context // attn.page_size)
    cache = torch.zeros(pages, attn.page_size, attn.num_kv_heads, attn.head_dim, dtype=attn.torch_dtype)
    q = torch.randn(1, attn.num_heads, attn.head_dim).to(attn.torch_dtype)
    block_table = torch.arange(pages, dtype=torch.int32)[None, :]
    calls, original = [0], module.kv_tile_offsets

    def counted(*args):
        calls[0] += 1
        return original(*args)

    module.kv_tile_offsets = counted
    try:
        attention_decode.launch(variant, q, cache, cache, torch.tensor([context], dtype=torch.int32), block_table,
                                num_splits=num_splits)
    finally:
        module.kv_tile_offsets = original
    return calls[0], variant.block_n


def visited_tiles(layout: BlockSparseLayout | None, context: int, *, page_size: int = 16, head_dim: int = 64,
                  num_heads: int = 1, dtype: str = "bf16", target: str = "h100", num_splits: int = 1) -> dict:
    """The KV tiles the decode kernel visits for one query at position context - 1 (layout None:
    dense), and those the dense kernel visits, both counted under the Triton interpreter.

    Preconditions: TRITON_INTERPRET=1 can still be set (triton not yet imported without it), and
    layout.block_size is a multiple of page_size. Returns {"visited_tiles", "dense_tiles",
    "block_n", "visible_keys", "layout_density"} (layout_density: `BlockSparseLayout.density`
    over the context's layout blocks, 1.0 for dense).
    """
    from kiln.process import enable_interpreter

    enable_interpreter()
    from kiln.codegen.kernels.attention import AttentionParams

    block_sparse = None if layout is None else (layout.block_size, layout.local_blocks, layout.vertical_stride)
    attn = AttentionParams(dtype, num_heads, 1, head_dim, page_size, block_sparse=block_sparse)
    dense = AttentionParams(dtype, num_heads, 1, head_dim, page_size)
    visited, block_n = _count_tiles(attn, context, target, num_splits)
    dense_tiles, _ = _count_tiles(dense, context, target, num_splits)
    density = 1.0 if layout is None else layout.density(-(-context // layout.block_size))
    return {"visited_tiles": visited, "dense_tiles": dense_tiles, "block_n": block_n,
            "visible_keys": attn.visible_keys(context), "layout_density": density}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--target", default="h100", help="whose decode tiles (a GPU target name)")
    args = parser.parse_args()
    print(f"decode KV tiles at context {args.context} ({args.target} tiles, pages of 16, layout blocks of 64)")
    print(f"{'layout':<12} {'density':>8} {'tiles':>6} {'dense':>6} {'ratio':>6}")
    for name, layout in {"dense": None, **LAYOUTS}.items():
        row = visited_tiles(layout, args.context, target=args.target)
        print(f"{name:<12} {row['layout_density']:>8.3f} {row['visited_tiles']:>6} {row['dense_tiles']:>6} "
              f"{row['visited_tiles'] / row['dense_tiles']:>6.3f}")


if __name__ == "__main__":
    main()
