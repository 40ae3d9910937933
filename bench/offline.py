"""Offline throughput, nano-vllm / vLLM style: N requests with random input and output lengths
(seeded, ignore_eos), all submitted at once. kiln (continuous batching over the compiled cpu
artifact) against Hugging Face transformers `generate` (static batches, padded) on the same
model, prompts and machine, in one run. Also: batch-1 decode tokens/s of both, and kiln's KV
slot utilisation (live tokens / allocated slots, averaged over steps). The 1-minute load average
before and after each run, and the thread counts kiln's CPU executor chose per step, show how
busy the (shared) machine was.

    python bench/offline.py [--model smollm2-135m] [--num-requests 32] [--hf-batch 8] [--block-size 16]

Prints the figures and writes bench/results/offline.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import transformers

import kiln
from kiln.compiler import CompileOptions, compile_cached
from kiln.frontend import load_checkpoint, save_hf_dir


def make_requests(args, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(args.min_input, args.max_input))],
             rng.randint(args.min_output, args.max_output)) for _ in range(args.num_requests)]


def run_kiln(llm: kiln.LLM, requests) -> dict:
    engine = llm.engine
    for i, (prompt, out_len) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, kiln.SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True))
    utilisation, threads, tokens, load = [], collections.Counter(), 0, os.getloadavg()[0]
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        running = engine.scheduler.running
        live = sum(seq.num_tokens for seq in running)
        used = engine.stats().kv_blocks_used * llm.executor.block_size
        if used:
            utilisation.append(live / used)
        tokens += sum(len(c.delta_token_ids) for out in engine.step() for c in out.outputs)
        threads[getattr(llm.executor, "step_threads", None)] += 1
    seconds = time.perf_counter() - start
    return {"output_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "kv_slot_utilisation": statistics.mean(utilisation), "load_avg_1min": [load, os.getloadavg()[0]],
            "steps_by_threads": {str(k): n for k, n in sorted(threads.items(), key=str)}}


@torch.inference_mode()
def run_hf(model, requests, batch_size: int) -> dict:
    tokens, load, start = 0, os.getloadavg()[0], time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(n for _, n in batch)
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        tokens += sum(n for _, n in batch)  # tokens the requests asked for (padding work not counted)
    seconds = time.perf_counter() - start
    return {"output_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "load_avg_1min": [load, os.getloadavg()[0]]}


def decode_rate_kiln(llm: kiln.LLM, prompt: list[int], n: int) -> float:
    times = [time.perf_counter() for _ in llm.stream(prompt, kiln.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))]
    return (len(times) - 1) / (times[-1] - times[0])


@torch.inference_mode()
def decode_rate_hf(model, prompt: list[int], n: int) -> float:
    out = model(torch.tensor([prompt]), use_cache=True)
    start = time.perf_counter()
    for _ in range(n - 1):
        token = out.logits[:, -1:].argmax(-1)
        out = model(token, cache=out.cache, use_cache=True)
    return (n - 1) / (time.perf_counter() - start)


def _load(result: dict) -> str:
    return "load average {:.1f} -> {:.1f}".format(*result["load_avg_1min"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--min-input", type=int, default=16)
    parser.add_argument("--max-input", type=int, default=256)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=16, help="KV-cache block size the artifact is compiled with")
    parser.add_argument("--out", default="bench/results/offline.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    print(f"loading {args.model} (kiln compiles through its cache; transformers loads the same weights)", flush=True)
    summary = compile_cached(args.model, CompileOptions(target="cpu", block_size=args.block_size))
    llm = kiln.LLM(str(summary.artifact), kv_cache_memory=1 << 30, max_model_len=2048)
    ckpt = load_checkpoint(args.model, progress=False)
    hf_dir = Path("bench/results") / f"hf-{args.model}"
    if not (hf_dir / "config.json").exists():
        save_hf_dir(ckpt, hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    requests = make_requests(args, llm.executor.vocab_size)
    print(f"{len(requests)} requests, {sum(len(p) for p, _ in requests)} prompt tokens, "
          f"{sum(n for _, n in requests)} output tokens", flush=True)

    kiln_result = run_kiln(llm, requests)
    print(f"kiln          {kiln_result['tokens_per_s']:8.1f} output tok/s  ({kiln_result['seconds']:.1f} s, "
          f"KV slot utilisation {kiln_result['kv_slot_utilisation']:.1%}, {_load(kiln_result)}, "
          f"steps by threads {kiln_result['steps_by_threads']})", flush=True)
    hf_result = run_hf(model, requests, args.hf_batch)
    print(f"transformers  {hf_result['tokens_per_s']:8.1f} output tok/s  ({hf_result['seconds']:.1f} s, "
          f"batches of {args.hf_batch}, "
          f"{_load(hf_result)})", flush=True)
    ratio = kiln_result["tokens_per_s"] / hf_result["tokens_per_s"]
    print(f"ratio         {ratio:8.2f}x", flush=True)

    prompt = requests[0][0][:32]
    kiln_b1, hf_b1 = decode_rate_kiln(llm, prompt, args.decode_tokens), decode_rate_hf(model, prompt, args.decode_tokens)
    print(f"batch-1 decode: kiln {kiln_b1:.1f} tok/s, transformers {hf_b1:.1f} tok/s ({kiln_b1 / hf_b1:.2f}x)", flush=True)

    result = {"model": args.model, "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "args": vars(args), "kiln": kiln_result, "transformers": hf_result, "throughput_ratio": ratio,
              "batch1_decode_tokens_per_s": {"kiln": kiln_b1, "transformers": hf_b1}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
