"""Expert blocks the generated GPU fused-MoE kernels visit, for one Qwen3-30B-A3B-shaped layer's
routing (128 experts, top 8; a random N(0, 0.02) router as bench/moe.py's) at 1, 16 and 256 tokens.

Runs the `align` kernel of a GPU target's variants under the Triton interpreter on the CPU and
reads what it wrote: the padded pair count (the M-blocks the grouped GEMMs compute: every block
holds one expert's pairs; blocks of the static bound past it exit at once) and each block's
expert, checked against the experts the router chose. The GEMMs' programs are these blocks
times their N tiles.

    python bench/moe_blocks.py [--tokens 1,16,256] [--target h100]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from kiln.codegen.kernels import moe
from kiln.codegen.targets import get_target

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 2048, 768, 128, 8
RESULTS = Path(__file__).parent / "results" / "moe_blocks.json"


def routing(tokens: int) -> torch.Tensor:
    """ids [T, TOP_K] int64 of softmax-top-k routing with a random router, on random inputs."""
    g = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, HIDDEN, generator=g) @ (torch.randn(HIDDEN, EXPERTS, generator=g) * 0.02)
    return torch.topk(torch.softmax(logits, dim=-1), TOP_K, dim=-1).indices


def visited(tokens: int, target: str) -> dict:
    params = moe.MoeParams("bf16", "fp32", "i64", EXPERTS, TOP_K, HIDDEN, HIDDEN, INTERMEDIATE, "silu", None, None, False)
    align, gate_up, down = moe.choose(get_target(target), params, tokens)
    ids = routing(tokens)
    rows, bound = moe.padded_rows(align, tokens), moe.padded_blocks(align, tokens)
    sorted_pairs, block_experts = torch.empty(rows, dtype=torch.int32), torch.empty(bound, dtype=torch.int32)
    num_padded = torch.empty(1, dtype=torch.int32)
    moe.load(align).kernel[moe.grid(align, tokens)](ids, sorted_pairs, block_experts, num_padded, tokens,
                                                    **moe.constexprs(align), num_warps=align.num_warps)
    blocks = int(num_padded) // align.block_m
    hit = set(ids.flatten().tolist())
    assert set(block_experts[:blocks].tolist()) == hit, "every visited block belongs to a chosen expert, and each has one"
    n_tiles = {v.stage: -(-(INTERMEDIATE if v.stage == "gate_up" else HIDDEN) // v.block_n) for v in (gate_up, down)}
    return {"tokens": tokens, "experts_hit": len(hit), "block_m": align.block_m, "blocks_visited": blocks,
            "blocks_bound": bound, "gate_up_programs": blocks * n_tiles["gate_up"], "down_programs": blocks * n_tiles["down"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,16,256")
    parser.add_argument("--target", default="h100")
    args = parser.parse_args()
    print(f"{'tokens':>6} {'experts hit':>11} {'BLOCK_M':>7} {'blocks visited':>14} {'of the bound':>12} "
          f"{'gate_up programs':>16} {'down programs':>13}")
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        rows.append(r := visited(tokens, args.target))
        print(f"{r['tokens']:>6} {r['experts_hit']:>11} {r['block_m']:>7} {r['blocks_visited']:>14} "
              f"{r['blocks_bound']:>12} {r['gate_up_programs']:>16} {r['down_programs']:>13}", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"target": args.target, "rows": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
