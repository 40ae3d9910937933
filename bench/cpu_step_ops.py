"""Per-op time of the cpu target's step ops outside the linears, torch vs the C kernels
(runtime/cpu_step_kernels.py), on SmolLM2-135M's shapes (D 576, 9 heads, 3 kv heads of 64, I 1536,
KV pages of 16) at decode batch sizes and contexts. Each op is called as the step programs call it
(rope on a view of the fused qkv projection's output; rope_write: rope q, rope k, write k, write v;
silu_as_emitted: the torch ops today's programs run for silu_mul); a time is the median over
--repeats runs of --calls calls, in microseconds per call, on the threads torch uses (--threads).
The machine's load average is printed: on a shared machine rerun when it is low.

    python bench/cpu_step_ops.py [--batch 1 8] [--context 128 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kiln.codegen.cpu_step_kernels import build_step_library
from kiln.runtime import cpu_ops, cpu_step_kernels

D, H, HKV, DH, INTER, BS = 576, 9, 3, 64, 1536, 16


def _time(fn, calls: int, repeats: int) -> float:
    """Median microseconds per call of fn()."""
    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def _cases(batch: int, context: int) -> dict:
    """op name -> a callable running it once on fresh random inputs of SmolLM2's shapes."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(batch, D, generator=g), torch.randn(D, generator=g)
    qkv = torch.randn(batch, (H + 2 * HKV) * DH, generator=g)
    q, k = qkv.narrow(1, 0, H * DH).reshape(batch, H, DH), qkv.narrow(1, H * DH, HKV * DH).reshape(batch, HKV, DH)
    table = cpu_ops.rope_table(torch.full((batch,), context - 1), 1e-4 ** (torch.arange(DH // 2) / (DH // 2)),
                               torch.float32)
    pages = -(-context // BS)
    block_tables = torch.randperm(batch * pages, generator=g).to(torch.int32).view(batch, pages)
    caches = [torch.randn(batch * pages, BS, HKV, DH, generator=g) for _ in range(2)]
    slots = cpu_ops.cache_slots((block_tables[:, -1] * BS + (context - 1) % BS).to(torch.int32))
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    gate_up = torch.randn(batch, 2 * INTER, generator=g)
    v = qkv.narrow(1, (H + HKV) * DH, HKV * DH).reshape(batch, HKV, DH)
    q_rot = cpu_ops.rope(q, table).contiguous()
    return {
        "rms_norm": lambda: cpu_ops.rms_norm(x, w, 1e-5),
        "rope_q": lambda: cpu_ops.rope(q, table),
        "rope_k": lambda: cpu_ops.rope(k, table),
        "write_cache": lambda: cpu_ops.write_cache(k, caches[0], slots),
        "rope_write": lambda: cpu_ops.rope_write(q, k, v, table, *caches, slots),
        "rope_write_qkv": lambda: cpu_ops.rope_write_qkv(qkv, H, HKV, DH, table, *caches, slots),
        "decode_attention": lambda: cpu_ops.decode_attention(q_rot, *caches, seq_lens, block_tables, scale=DH ** -0.5),
        "silu_mul": lambda: cpu_ops.silu_mul(gate_up),
        "silu_as_emitted": lambda: torch.nn.functional.silu(gate_up.narrow(1, 0, INTER)) * gate_up.narrow(1, INTER, INTER),
        "add (reference)": lambda: x + x,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        kernels = cpu_step_kernels.load_step_library(out, build_step_library(Path(out)))
    results = []
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.2f}, kernels {kernels.variant}")
    print(f"{'op':<22}{'batch':>6}{'context':>8}{'torch us':>10}{'C us':>8}{'speedup':>9}")
    with torch.inference_mode():
        for batch in args.batch:
            for context in args.context:
                for name, fn in _cases(batch, context).items():
                    cpu_step_kernels.install(None)
                    torch_us = _time(fn, args.calls, args.repeats)
                    cpu_step_kernels.install(kernels)
                    c_us = _time(fn, args.calls, args.repeats)
                    cpu_step_kernels.install(None)
                    results.append(dict(op=name, batch=batch, context=context, torch_us=torch_us, c_us=c_us))
                    print(f"{name:<22}{batch:>6}{context:>8}{torch_us:>10.1f}{c_us:>8.1f}{torch_us / c_us:>8.1f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
