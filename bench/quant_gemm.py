"""kiln's quantized-linear C kernels (runtime/cpu_quant.py) against oneDNN fp32 on SmolLM2-135M's
linear shapes: q/k/v packed [960, 576], o [576, 576], gate/up packed [3072, 576], down [576, 1536]
and the tied LM head [49152, 576], for the shipped file's formats (Q4_1 layers = int4-g32-f16, the
Q8_0 table = int8-g32-f16).

Per shape, format and rows M: ms per call of
  kernel   cpu_quant.linear on the quantized weight (the C kernels; from TORCH_GEMM_ROWS rows on,
           blocks of the weight dequantized by them, multiplied by torch's fp32 GEMM);
  onednn   torch.ops.mkldnn._linear_pointwise on the dequantized fp32 weight packed by
           _reorder_linear_weight (what the cpu target runs for fp32 weights);
  deq+mm   (M >= 64) the weight dequantized by the kernels' row function, then torch.matmul: the
           alternative for prefill-sized M.
At M <= 16 each call reads another copy of the weight (copies spanning > 2x the L3 cache), as a
decode step streams its weights from memory; at larger M one copy. Medians of --repeats rounds,
the implementations interleaved. Then a whole decode step's linears (30 layers of distinct weights
plus the LM head) at M = 1 and 8, quantized against oneDNN fp32.

    python bench/quant_gemm.py [--rows 1,4,8,16,64,512] [--threads N] [--repeats 7]

Each time is a median of wall time and one of process CPU time (at 1 thread the CPU time leaves out
the time other processes preempt the benchmark; at more it counts threads waiting at barriers).
Prints a table and writes the run into bench/results/quant_gemm.json under its thread count (the
file names the CPU; a run on another CPU replaces it). On a machine others share, compare within a
row; each row records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import cpu_description, cpu_label

from kiln.codegen.cpu_kernels import build_quant_library
from kiln.quant import QuantFormat, quantize
from kiln.runtime import cpu_quant

RESULTS = Path(__file__).parent / "results" / "quant_gemm.json"
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
LAYER_SHAPES = ("qkv", "o", "gate_up", "down")
LAYERS = 30
LAYER_FORMAT, HEAD_FORMAT = QuantFormat("int4", 32, "f16"), QuantFormat("int8", 32, "f16")
STREAM_BYTES = 80 << 20  # at M <= STREAM_ROWS, the copies of a weight span this much (> 2x a 32 MB L3)
STREAM_ROWS = 16
def median_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float, float]]:
    """{name: (median wall ms, median process CPU ms, min wall ms) of calls[name]()}: one warm-up
    each, then `repeats` interleaved rounds. At 1 thread the CPU time leaves out the time other
    processes preempt the benchmark (at more it counts threads waiting at barriers too)."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for r in range(repeats):
        names = list(calls)
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            calls[name]()
            times[name].append(((time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3))
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t), min(w for w, _ in t))
            for name, t in times.items()}


def _copies(nbytes: int, rows: int) -> int:
    return max(1, -(-STREAM_BYTES // nbytes)) if rows <= STREAM_ROWS else 1


def bench_shape(library, name: str, fmt: QuantFormat, rows: list[int], repeats: int) -> list[dict]:
    n, k = SHAPES[name]
    weight = torch.randn(n, k) * 0.05
    return [_bench_rows(library, name, weight, fmt, m, repeats) for m in rows]


def _bench_rows(library, name: str, weight: torch.Tensor, fmt: QuantFormat, m: int, repeats: int) -> dict:
    n, k = weight.shape
    qt = quantize(weight, fmt)
    qs = [cpu_quant.bind(library, quantize(weight, fmt)) for _ in range(_copies(qt.nbytes, m))]
    dense = [torch.ops.mkldnn._reorder_linear_weight(qt.dequantize()) for _ in range(_copies(n * k * 4, m))]
    x = torch.randn(m, k)
    calls = {"kernel": lambda: [cpu_quant.linear(x, q) for q in qs],
             "onednn": lambda: [torch.ops.mkldnn._linear_pointwise(x, d, None, "none", [], "") for d in dense]}
    if m >= 64:
        ids = torch.arange(n)
        calls["deq+mm"] = lambda: [torch.matmul(x, cpu_quant.embedding(ids, q).t()) for q in qs]
    ms = median_ms(calls, repeats)
    per_call = {key: (wall / len(dense if key == "onednn" else qs), cpu / len(dense if key == "onednn" else qs))
                for key, (wall, cpu, _) in ms.items()}
    row = {"shape": name, "format": fmt.name, "N": n, "K": k, "M": m,
           "kernel_ms": per_call["kernel"][0], "onednn_ms": per_call["onednn"][0],
           "deq_mm_ms": per_call["deq+mm"][0] if "deq+mm" in per_call else None,
           "kernel_cpu_ms": per_call["kernel"][1], "onednn_cpu_ms": per_call["onednn"][1],
           "deq_mm_cpu_ms": per_call["deq+mm"][1] if "deq+mm" in per_call else None,
           "weight_copies": len(qs), "load_average": os.getloadavg()[0]}
    row["speedup"] = row["onednn_ms"] / row["kernel_ms"]
    row["speedup_cpu"] = row["onednn_cpu_ms"] / row["kernel_cpu_ms"]
    row["kernel_gb_s"] = qt.nbytes / row["kernel_ms"] / 1e6
    print(f"{name:8s} {fmt.name:13s} M={m:4d}  kernel {row['kernel_ms']:8.3f} ms ({row['kernel_gb_s']:5.1f} GB/s)  "
          f"onednn {row['onednn_ms']:8.3f} ms  x{row['speedup']:5.2f} (cpu time x{row['speedup_cpu']:5.2f})"
          + (f"  deq+mm {row['deq_mm_ms']:8.3f} ms" if row["deq_mm_ms"] else ""), flush=True)
    return row


def bench_decode_step(library, repeats: int) -> list[dict]:
    """A decode step's linears at M = 1 and 8: 30 layers of distinct weights, then the LM head
    (4 * --repeats rounds: the minimum shows the step on a quiet machine)."""
    layers = [[quantize(torch.randn(*SHAPES[s]) * 0.05, LAYER_FORMAT) for s in LAYER_SHAPES] for _ in range(LAYERS)]
    head = quantize(torch.randn(*SHAPES["lm_head"]) * 0.05, HEAD_FORMAT)
    quantized = [cpu_quant.bind(library, q) for layer in layers for q in layer] + [cpu_quant.bind(library, head)]
    dense = [torch.ops.mkldnn._reorder_linear_weight(q.qt.dequantize()) for q in quantized]
    nbytes = sum(q.qt.nbytes for q in quantized)
    out = []
    for m in (1, 8):
        xs = [torch.randn(m, q.k) for q in quantized]
        ms = median_ms({"kernel": lambda xs=xs: [cpu_quant.linear(x, q) for x, q in zip(xs, quantized)],
                        "onednn": lambda xs=xs: [torch.ops.mkldnn._linear_pointwise(x, d, None, "none", [], "")
                                                 for x, d in zip(xs, dense)]}, 4 * repeats)
        row = {"M": m, "calls": len(quantized), "quantized_mb": nbytes / 1e6, "kernel_ms": ms["kernel"][0],
               "onednn_fp32_ms": ms["onednn"][0], "kernel_cpu_ms": ms["kernel"][1], "onednn_fp32_cpu_ms": ms["onednn"][1],
               "kernel_min_ms": ms["kernel"][2], "onednn_fp32_min_ms": ms["onednn"][2],
               "speedup": ms["onednn"][0] / ms["kernel"][0], "kernel_gb_s": nbytes / ms["kernel"][0] / 1e6,
               "load_average": os.getloadavg()[0]}
        out.append(row)
        print(f"decode step linears M={m}: kernel {row['kernel_ms']:.2f} ms ({row['kernel_gb_s']:.1f} GB/s of "
              f"{row['quantized_mb']:.0f} MB; min {row['kernel_min_ms']:.2f}, cpu {row['kernel_cpu_ms']:.2f} ms), oneDNN fp32 "
              f"{row['onednn_fp32_ms']:.2f} ms (min {row['onednn_fp32_min_ms']:.2f}, cpu {row['onednn_fp32_cpu_ms']:.2f} ms): "
              f"x{row['speedup']:.2f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,16,64,512")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        library = cpu_quant.load_quant_library(tmp, build_quant_library([LAYER_FORMAT, HEAD_FORMAT], Path(tmp)))
        print(f"{cpu_label(cpu_description())}, {args.threads} threads, kernels {library.variant}")
        table = []
        for name in SHAPES:
            for fmt in (LAYER_FORMAT, HEAD_FORMAT):
                table += bench_shape(library, name, fmt, [m for m in rows if name != "lm_head" or m <= 64], args.repeats)
        step = bench_decode_step(library, args.repeats)
        run = {"torch": torch.__version__, "variant": library.variant, "repeats": args.repeats,
               "gcc": subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip(),
               "shapes": table, "decode_step": step}
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if result.get("cpu") != cpu_description() or "runs" not in result:
        result = {"cpu": cpu_description(), "runs": {}}
    result["runs"][f"threads={args.threads}"] = run
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
