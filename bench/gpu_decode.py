"""Decode-step latency on a GPU: CUDA-graph replay against eager launches, side by side.

Compiles the model for this GPU's target (through the compile cache) and builds an executor
replaying CUDA graphs (buckets up to --max-num-seqs), then one with enforce_eager: one at a time,
each freed before the next, since an executor sizes its KV cache from --gpu-memory-utilization of
the GPU less what this process already holds (a live executor's cache would leave the next none).
For each batch size B it times decode steps of B sequences whose context is --context tokens
(their own KV blocks) and reports the median milliseconds per step (logits copied out as fp32, as
the engine gets them), decode tokens/s, and the speed-up of the graphs. On the GPU machine (no
model wheels) --model is an HF directory, e.g. a random-weight one (bench/gpu_check.py builds them).

    python bench/gpu_decode.py [--model smollm2-135m] [--batch-sizes 1 8 32 128] [--context 512] [--steps 50]
    python bench/gpu_decode.py --interpret --model DIR ...   # the same code path on a CPU (tiny models only)

Prints the figures and writes bench/results/gpu_decode.json.
"""

from __future__ import annotations

import argparse
import gc
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


def time_executor(executor, batches: dict[int, object], steps: int, sync) -> dict[int, float]:
    """Median seconds of a step of each batch (after 3 warm-up steps)."""
    medians = {}
    for size, batch in batches.items():
        for _ in range(3):
            executor.execute(batch)
        medians[size] = statistics.median(time_step(executor, batch, sync) for _ in range(steps))
    return medians


def time_modes(artifact, args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """mode ("graphs", "eager") -> batch size -> median seconds per step, one executor at a time
    (each freed before the next is built: see the module docstring)."""
    from kiln.runtime.gpu_executor import GpuExecutor

    largest = max(args.batch_sizes)
    sync = torch.cuda.synchronize if not args.interpret else (lambda: None)
    batches = {size: decode_batch(size, args.context, artifact.manifest.block_size) for size in args.batch_sizes}
    times = {}
    for mode in ("graphs", "eager"):
        executor = GpuExecutor(artifact, interpret=args.interpret, gpu_memory_utilization=args.gpu_memory_utilization,
                               kv_cache_memory=256 << 20, max_model_len=args.max_model_len, max_num_seqs=largest,
                               max_num_batched_tokens=max(largest, 256), enforce_eager=mode == "eager")
        times[mode] = time_executor(executor, batches, args.steps, sync)
        del executor
        gc.collect()  # an executor and its CUDA graphs form a reference cycle
        if not args.interpret:
            torch.cuda.empty_cache()
    return times


def report(args: argparse.Namespace, target: str, times: dict[str, dict[int, float]]) -> None:
    """Prints the table and writes RESULTS."""
    device = "interpreted on the CPU" if args.interpret else torch.cuda.get_device_name()
    rows = []
    print(f"{args.model} on {device}, context {args.context}, median of {args.steps} steps")
    print(f"{'B':>5}  {'graphs ms':>10}  {'eager ms':>10}  {'graphs tok/s':>12}  {'speed-up':>8}")
    for size in args.batch_sizes:
        graphs, eager = times["graphs"][size], times["eager"][size]
        rows.append({"batch": size, "graphs_ms": graphs * 1e3, "eager_ms": eager * 1e3,
                     "graphs_tokens_per_s": size / graphs, "eager_tokens_per_s": size / eager,
                     "speedup": eager / graphs})
        print(f"{size:>5}  {graphs * 1e3:>10.3f}  {eager * 1e3:>10.3f}  {size / graphs:>12.1f}"
              f"  {eager / graphs:>7.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": args.model, "target": target, "device": device, "context": args.context,
                                   "steps": args.steps, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                        help="of the GPU, for each executor in turn")
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

    target = "b200" if args.interpret else local_target()
    artifact = load_artifact(compile_cached(args.model, CompileOptions(target=target), progress=True).artifact)
    report(args, target, time_modes(artifact, args))


if __name__ == "__main__":
    main()
