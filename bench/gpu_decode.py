"""Decode-step latency on a GPU: CUDA-graph replay against eager launches, side by side.

Compiles the model for this GPU's target (through the compile cache) and builds two executors
on the same artifact, one replaying CUDA graphs (buckets up to --max-num-seqs) and one with
enforce_eager, each given --gpu-memory-utilization of the GPU. For each batch size B it times
decode steps of B sequences whose context is --context tokens (their own KV blocks), alternating
the two executors, and reports the median milliseconds per step (logits copied out as fp32, as
the engine gets them), decode tokens/s, and the speed-up of the graphs.

    python bench/gpu_decode.py [--model smollm2-135m] [--batch-sizes 1 8 32 128] [--context 512] [--steps 50]
    python bench/gpu_decode.py --interpret --model DIR ...   # the same code path on a CPU (tiny models only)

Prints the figures and writes bench/results/gpu_decode.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "gpu_decode.json"


def decode_batch(batch: int, context: int, block_size: int):
    """A decode step of `batch` sequences at position context - 1; sequence i owns blocks
    [i * n, (i + 1) * n), n = ceil(context / block_size)."""
    from kiln.runtime.step_batch import StepBatch

    n = -(-context // block_size)
    tables = torch.arange(batch * n, dtype=torch.int32).reshape(batch, n)
    position = context - 1
    return StepBatch(input_ids=torch.zeros(batch, dtype=torch.int32),
                     positions=torch.full((batch,), position, dtype=torch.int32),
                     query_start=torch.arange(batch + 1, dtype=torch.int32),
                     seq_lens=torch.full((batch,), context, dtype=torch.int32), block_tables=tables,
                     slot_mapping=tables[:, position // block_size] * block_size + position % block_size,
                     logits_indices=torch.arange(batch, dtype=torch.int32), num_decodes=batch)


def time_step(executor, batch, sync) -> float:
    sync()
    start = time.perf_counter()
    executor.execute(batch)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="per executor (two run at once)")
    parser.add_argument("--interpret", action="store_true",
                        help="b200 kernels under Triton's interpreter, on a CPU (KV cache: 256 MiB)")
    args = parser.parse_args()
    if args.interpret:
        from kiln.process import enable_interpreter

        enable_interpreter()
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_decode.py needs a CUDA GPU (or --interpret with a tiny model)")
    from kiln.compiler import CompileOptions, compile_cached
    from kiln.llm import local_target
    from kiln.runtime.artifact import load_artifact
    from kiln.runtime.gpu_executor import GpuExecutor

    target = "b200" if args.interpret else local_target()
    summary = compile_cached(args.model, CompileOptions(target=target), progress=True)
    artifact = load_artifact(summary.artifact)
    largest = max(args.batch_sizes)
    executors = {
        mode: GpuExecutor(artifact, interpret=args.interpret, gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory=256 << 20, max_model_len=args.max_model_len,
                          max_num_seqs=largest, max_num_batched_tokens=max(largest, 256), enforce_eager=mode == "eager")
        for mode in ("graphs", "eager")
    }
    sync = torch.cuda.synchronize if torch.cuda.is_available() and not args.interpret else (lambda: None)
    device = "interpreted on the CPU" if args.interpret else torch.cuda.get_device_name()
    rows = []
    print(f"{args.model} on {device}, context {args.context}, median of {args.steps} steps")
    print(f"{'B':>5}  {'graphs ms':>10}  {'eager ms':>10}  {'graphs tok/s':>12}  {'speed-up':>8}")
    for size in args.batch_sizes:
        batch = decode_batch(size, args.context, artifact.manifest["block_size"])
        times = {mode: [] for mode in executors}
        for _ in range(3):  # warm-up
            for executor in executors.values():
                executor.execute(batch)
        for _ in range(args.steps):
            for mode, executor in executors.items():
                times[mode].append(time_step(executor, batch, sync))
        graphs, eager = (statistics.median(times[mode]) for mode in ("graphs", "eager"))
        rows.append({"batch": size, "graphs_ms": graphs * 1e3, "eager_ms": eager * 1e3,
                     "graphs_tokens_per_s": size / graphs, "eager_tokens_per_s": size / eager,
                     "speedup": eager / graphs})
        print(f"{size:>5}  {graphs * 1e3:>10.3f}  {eager * 1e3:>10.3f}  {size / graphs:>12.1f}"
              f"  {eager / graphs:>7.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": args.model, "target": target, "device": device, "context": args.context,
                                   "steps": args.steps, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
