"""Resident memory of the cpu executor for one long prompt: peak RSS while it runs and steady RSS
after it finishes, for prompts of 1k, 8k and 32k tokens (each capped at what the model's context
leaves for the output), against the baseline RSS before. One kiln.LLM serves every size, in this
order, after a short warm-up request (whose first steps touch the weights); its steps run on one
worker thread, as `kiln serve` runs them on its engine thread (glibc then allocates from a
per-thread arena, which keeps freed memory differently from the main one). Each prompt is fresh
random ids (no prefix-cache hits) and decodes `--max-tokens` tokens. Peaks are read from the
kernel's high-water mark (VmHWM), reset before each prompt (Linux).

    python bench/memory.py [--model smollm2-135m] [--sizes 1024,8192,32768] [--max-tokens 4]

Prints the figures and writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import kiln

MIB = 1 << 20


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Restarts VmHWM from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run_prompt(llm: kiln.LLM, engine_thread: ThreadPoolExecutor, length: int, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompt = [rng.randrange(100, llm.executor.vocab_size) for _ in range(length)]
    params = kiln.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    reset_peak()
    before = status_mib("VmRSS")
    start = time.perf_counter()
    engine_thread.submit(llm.generate, [prompt], params).result()
    return {"prompt_tokens": length, "rss_before_mib": before, "peak_rss_mib": status_mib("VmHWM"),
            "steady_rss_mib": status_mib("VmRSS"), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", default="1024,8192,32768", help="prompt lengths, capped at the context")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--kv-cache-memory", type=int, default=2 << 30, help="bytes")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--out", default="bench/results/memory.json")
    args = parser.parse_args()

    llm = kiln.LLM(args.model, target="cpu", kv_cache_memory=args.kv_cache_memory,
                   max_num_batched_tokens=args.max_num_batched_tokens, progress=False)
    loaded = status_mib("VmRSS")
    context = llm.executor.max_model_len
    sizes = sorted({min(int(s), context - args.max_tokens) for s in args.sizes.split(",")})
    engine_thread = ThreadPoolExecutor(max_workers=1)
    run_prompt(llm, engine_thread, 64, args.max_tokens, seed=0)  # warm-up
    baseline = status_mib("VmRSS")
    print(f"{args.model} on {cpu_name()}, {torch.get_num_threads()} threads; context {context} tokens, "
          f"step budget {args.max_num_batched_tokens} tokens; one LLM for every size, "
          "its steps on one worker thread")
    print(f"RSS after loading {loaded:.0f} MiB, after a 64-token warm-up (baseline) {baseline:.0f} MiB")
    results = []
    for size in sizes:
        result = run_prompt(llm, engine_thread, size, args.max_tokens, seed=size)
        results.append(result)
        print(f"{size:6d}-token prompt: peak {result['peak_rss_mib']:6.0f} MiB "
              f"({result['peak_rss_mib'] - baseline:+.0f}), steady {result['steady_rss_mib']:6.0f} MiB "
              f"({result['steady_rss_mib'] - baseline:+.0f}), {result['seconds']:.1f} s", flush=True)
    out = {"model": args.model, "cpu": cpu_name(), "threads": torch.get_num_threads(), "context": context,
           "one_llm_for_all_sizes": True, "steps_on_a_worker_thread": True, "args": vars(args), "rss_after_load_mib": loaded,
           "baseline_rss_mib": baseline, "prompts": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
