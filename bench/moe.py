"""One mixture-of-experts layer on the CPU: kiln's cpu path against transformers.

The layer has Qwen3-30B-A3B's shape (hidden 2048, moe_intermediate 768, 128 experts, top-8,
norm_topk_prob) and random weights (N(0, 0.02), so routing spreads tokens over the experts:
~8 experts hit at 1 token, ~80 at 16, all 128 at 256). transformers runs its
Qwen3MoeSparseMoeBlock with each experts implementation (`grouped_mm`, its default, and `eager`,
picked through config._experts_implementation); kiln runs what its generated cpu program runs
for the block: the router through `cpu_ops.linear_t` (its weight stored transposed), softmax in
fp32, top-k, renormalized, then `cpu_ops.moe` on the expert weights as the executor hands them
(fp32 packed by `cpu_moe.pack_experts`, bf16 as stored). Both sides keep freed memory in the heap
(`keep_freed_memory`, as the executor does).

For each thread count, dtype and token count: ms per layer call, the median of --repeats calls
of each implementation, interleaved (the order rotates every round) after one warm-up call each;
speedup = transformers' ms / kiln's ms, by wall time and by process CPU time (at 1 thread the
CPU time leaves out the time other processes preempt it; at more, it counts threads waiting at
barriers); max |kiln - grouped_mm| over the output. On a machine other processes share, compare
within a row only; each row records the load average. At most ~2 copies
of the layer's weights are alive (fp32: 2.4 GB each): transformers' and kiln's packed one.

    python bench/moe.py [--tokens 1,16,256] [--dtypes float32,bfloat16] [--threads 1,2] [--repeats 5]

Prints a table and writes bench/results/moe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_description, cpu_label
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from kiln.runtime import cpu_moe, cpu_ops
from kiln.runtime.executor import keep_freed_memory

RESULTS = Path(__file__).parent / "results" / "moe.json"
CONFIG = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)
HF_IMPLEMENTATIONS = ("grouped_mm", "eager")


def hf_block(dtype: torch.dtype) -> Qwen3MoeSparseMoeBlock:
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(**CONFIG)).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block.to(dtype)


def layers(block: Qwen3MoeSparseMoeBlock) -> dict:
    """name -> fn(x [T, H]) -> [T, H]: transformers' block per experts implementation, and kiln's."""
    top_k = block.gate.top_k
    router_t = block.gate.weight.detach().t().contiguous()
    w_gate_up = cpu_moe.pack_experts(block.experts.gate_up_proj.detach())
    w_down = cpu_moe.pack_experts(block.experts.down_proj.detach())

    def kiln(x):
        probs = torch.softmax(cpu_ops.linear_t(x, router_t).float(), dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        return cpu_ops.moe(x, weights / weights.sum(dim=-1, keepdim=True), ids, w_gate_up, w_down,
                           activation="silu", alpha=None, limit=None)

    def transformers(implementation):
        def run(x):
            block.experts.config._experts_implementation = implementation
            return block(x[None])[0]
        return run

    return {"kiln": kiln, **{name: transformers(name) for name in HF_IMPLEMENTATIONS}}


def measure(fns: dict, x: torch.Tensor, repeats: int) -> dict:
    """Median wall and CPU ms per call of each fn on x (interleaved, rotating order), the speedups
    by each, and kiln's max |diff| from grouped_mm."""
    outputs = {name: fn(x) for name, fn in fns.items()}  # warm-up
    names, wall, cpu = list(fns), {name: [] for name in fns}, {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name](x)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    ms = {name: 1e3 * statistics.median(t) for name, t in wall.items()}
    cpu_ms = {name: 1e3 * statistics.median(t) for name, t in cpu.items()}
    diff = (outputs["kiln"].float() - outputs["grouped_mm"].float()).abs().max().item()
    return {"ms": {k: round(v, 2) for k, v in ms.items()}, "cpu_ms": {k: round(v, 2) for k, v in cpu_ms.items()},
            "speedup": {name: round(ms[name] / ms["kiln"], 2) for name in HF_IMPLEMENTATIONS},
            "cpu_speedup": {name: round(cpu_ms[name] / cpu_ms["kiln"], 2) for name in HF_IMPLEMENTATIONS},
            "max_abs_diff_vs_grouped_mm": diff, "max_abs_output": outputs["grouped_mm"].float().abs().max().item(),
            "load_average": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,16,256")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    threads = sorted({int(t) for t in args.threads.split(",")})
    keep_freed_memory()
    cpu = cpu_description()
    result = {"cpu": cpu, "config": CONFIG, "torch": torch.__version__, "repeats": args.repeats,
              "load_average_start": os.getloadavg()[0], "rows": []}
    print(f"CPU: {cpu_label(cpu)}, {cpu['cores']} cores; SIMD: {' '.join(cpu['simd_flags'])}; "
          f"without: {' '.join(cpu['missing_simd_flags'])}; load average {result['load_average_start']:.2f}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        block = hf_block(dtype)
        fns = layers(block)
        with torch.inference_mode():
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                for t in tokens:
                    x = torch.randn(t, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(t)).to(dtype)
                    row = {"threads": n_threads, "dtype": dtype_name, "tokens": t, **measure(fns, x, args.repeats)}
                    result["rows"].append(row)
                    print(f"  {dtype_name} threads={n_threads} T={t}: " + ", ".join(f"{k} {v} ms" for k, v in row["ms"].items()),
                          flush=True)
        del block, fns
    result["load_average_end"] = os.getloadavg()[0]
    print(f"\nwall ms per layer call (median of {args.repeats}); x = transformers ms / kiln ms, by wall time "
          f"and by process CPU time (at 1 thread: time preempted by other processes left out)")
    print(f"{'threads':>7} {'dtype':>8} {'tokens':>6} {'kiln':>8} {'grouped':>8} {'eager':>8} {'x grouped':>9} "
          f"{'x eager':>7} {'cpu x grouped':>13} {'cpu x eager':>11} {'max|diff|':>9} {'load':>5}")
    for r in result["rows"]:
        ms, speedup, cpu_speedup = r["ms"], r["speedup"], r["cpu_speedup"]
        print(f"{r['threads']:>7} {r['dtype']:>8} {r['tokens']:>6} {ms['kiln']:>8.1f} {ms['grouped_mm']:>8.1f} "
              f"{ms['eager']:>8.1f} {speedup['grouped_mm']:>9.2f} {speedup['eager']:>7.2f} "
              f"{cpu_speedup['grouped_mm']:>13.2f} {cpu_speedup['eager']:>11.2f} "
              f"{r['max_abs_diff_vs_grouped_mm']:>9.1e} {r['load_average']:>5.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
