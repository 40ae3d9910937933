"""Decode attention time of the `cpu` target (runtime/cpu_ops.decode_attention) at a long context,
dense and block-sparse (layout blocks of 64 tokens, KV pages of 16, densities ~1/2, 1/4, 1/8).

The goal: a layout of density d (BlockSparseLayout.density over the context's layout blocks)
takes at most d x dense + 0.25 x dense. Each variant's time is the median of `runs` calls after
a warm-up, the variants taking turns, so that a change in the machine's load hits them alike.
Writes the results as JSON too (default bench/results/sparse_decode.json).

    python bench/sparse_decode.py [--context 8192] [--batch 4] [--runs 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kiln.ir.specs import BlockSparseLayout
from kiln.runtime import cpu_ops
from kiln.runtime.executor import keep_freed_memory

PAGE = 16
LAYOUTS = {  # name -> layout of density ~1/2, 1/4, 1/8 at 8k (two local blocks, every 2nd/4th/8th vertical)
    "sparse 1/2": BlockSparseLayout(64, local_blocks=2, vertical_stride=2),
    "sparse 1/4": BlockSparseLayout(64, local_blocks=2, vertical_stride=4),
    "sparse 1/8": BlockSparseLayout(64, local_blocks=2, vertical_stride=8),
}
GOAL_SLACK = 0.25  # of the dense time, on top of density x dense


def decode_times(context: int = 8192, batch: int = 4, num_heads: int = 32, num_kv_heads: int = 8,
                 head_dim: int = 128, runs: int = 7, layouts: dict[str, BlockSparseLayout] = LAYOUTS) -> dict:
    """Times one fp32 decode_attention call over `batch` sequences of about `context` tokens
    (context - 13 b for sequence b, so groups pad) in shuffled pages of 16, dense and with each
    of `layouts`. Returns {"dense": {"ms": ...}, name: {"layout": [block_size, local_blocks,
    vertical_stride], "density": d, "ms": ..., "vs_dense": ms / dense ms, "goal_ms": (d + 0.25)
    x dense ms, "meets_goal": bool}, ...} (ms: the median over `runs` calls)."""
    keep_freed_memory()  # as the cpu executor does: gathered contexts reuse the heap instead of fresh pages
    g = torch.Generator().manual_seed(0)
    seq_lens = torch.tensor([context - 13 * b for b in range(batch)], dtype=torch.int32)
    pages = -(-context // PAGE)
    k_cache, v_cache = (torch.randn(batch * pages + 1, PAGE, num_kv_heads, head_dim, generator=g) for _ in range(2))
    block_tables = (torch.randperm(batch * pages, generator=g) + 1).view(batch, pages).int()
    q = torch.randn(batch, num_heads, head_dim, generator=g)
    calls = {"dense": None, **{name: (layout.block_size, layout.local_blocks, layout.vertical_stride)
                               for name, layout in layouts.items()}}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for run in range(runs + 1):  # run 0 warms up
        for name, layout in calls.items():
            start = time.perf_counter()
            cpu_ops.decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale=head_dim ** -0.5, layout=layout)
            if run:
                times[name].append(1e3 * (time.perf_counter() - start))
    dense_ms = statistics.median(times["dense"])
    results = {"dense": {"ms": round(dense_ms, 3)}}
    for name, layout in layouts.items():
        ms, density = statistics.median(times[name]), layout.density(-(-context // layout.block_size))
        goal = (density + GOAL_SLACK) * dense_ms
        results[name] = {"layout": list(calls[name]), "density": round(density, 4), "ms": round(ms, 3),
                         "vs_dense": round(ms / dense_ms, 3), "goal_ms": round(goal, 3), "meets_goal": ms <= goal}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "sparse_decode.json")
    args = parser.parse_args()
    results = decode_times(args.context, args.batch, runs=args.runs)
    print(f"decode attention, batch {args.batch}, context {args.context}, 32 heads / 8 kv heads of 128, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<12} {'layout':<12} {'density':>8} {'ms':>9} {'vs dense':>9} {'goal ms':>9}  meets goal")
    for name, r in results.items():
        layout = "x".join(map(str, r.get("layout", []))) or "-"
        print(f"{name:<12} {layout:<12} {r.get('density', 1.0):>8.3f} {r['ms']:>9.2f} {r.get('vs_dense', 1.0):>9.3f} "
              f"{r.get('goal_ms', r['ms']):>9.2f}  {r.get('meets_goal', '-')}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                     "context": args.context, "batch": args.batch, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
