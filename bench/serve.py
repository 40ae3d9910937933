"""Online serving benchmark, following vLLM's `vllm bench serve` methodology.

Requests with random token-id prompts (lengths drawn with a seed around --input-len /
--output-len, ±--range-ratio) arrive as a Poisson process at --request-rate (inf: all at once),
optionally capped at --max-concurrency in flight. Each is a streamed /v1/completions call with
an explicit temperature, ignore_eos and max_tokens = its output length, so every request
generates exactly that many tokens. Per request: TTFT (send to first token), ITL (gaps between
the following tokens), TPOT ((latency - TTFT) / (output tokens - 1)) and E2E latency.
Reports mean, p50, p90, p99 of each, request and token throughput; prints a table and writes
JSON (bench/results/serve.json). One warm-up request runs first and is not counted.

Without --url it starts `kiln serve` on a free loopback port for --model (compiled through the
compile cache first) and stops it at the end.

    python bench/serve.py --model smollm2-135m --num-prompts 48 --request-rate 1 --input-len 128 --output-len 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

FIRST_TOKEN_ID = 32  # draw prompt tokens above the ids that tokenizers reserve for special tokens
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # tokens the server reported (usage.completion_tokens)
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str | None = None


def sample_requests(args, vocab_size: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request, reproducible from args.seed."""
    rng = np.random.default_rng(args.seed)

    def lengths(mean: int) -> np.ndarray:
        low, high = max(1, int(mean * (1 - args.range_ratio))), int(mean * (1 + args.range_ratio))
        return rng.integers(low, high + 1, size=args.num_prompts)

    input_lens, output_lens = lengths(args.input_len), lengths(args.output_len)
    return [(rng.integers(FIRST_TOKEN_ID, vocab_size, size=n).tolist(), int(m)) for n, m in zip(input_lens, output_lens)]


async def send(http: httpx.AsyncClient, model: str, prompt: list[int], output_len: int, temperature: float
               ) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(len(prompt), 0)
    start = last = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                now = time.perf_counter()
                if chunk["choices"]:
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
        result.latency = time.perf_counter() - start
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run(args, url: str, model: str, requests: list[tuple[list[int], int]]) -> tuple[list[RequestResult], float]:
    """Send every request on its Poisson schedule; (results, benchmark duration in seconds)."""
    rng = np.random.default_rng(args.seed + 1)
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))
    timeout = httpx.Timeout(args.timeout)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=None),
                                 headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}) as http:
        warmup = await send(http, model, requests[0][0], 2, args.temperature)
        if warmup.error:
            raise SystemExit(f"warm-up request failed: {warmup.error}")

        async def limited(prompt, output_len):
            async with limit:
                return await send(http, model, prompt, output_len, args.temperature)

        tasks = []
        start = time.perf_counter()
        for prompt, output_len in requests:
            tasks.append(asyncio.create_task(limited(prompt, output_len)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.error is None]

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean_ms": None, **{f"p{p}_ms": None for p in PERCENTILES}}
        ms = np.asarray(values) * 1000
        return {"mean_ms": float(ms.mean()), **{f"p{p}_ms": float(np.percentile(ms, p)) for p in PERCENTILES}}

    output_tokens = sum(r.output_len for r in done)
    input_tokens = sum(r.prompt_len for r in done)
    return {
        "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput_per_s": len(done) / duration,
        "output_token_throughput_per_s": output_tokens / duration,
        "total_token_throughput_per_s": (input_tokens + output_tokens) / duration,
        "ttft": stats([r.ttft for r in done]),
        "tpot": stats([(r.latency - r.ttft) / (r.output_len - 1) for r in done if r.output_len > 1]),
        "itl": stats([gap for r in done for gap in r.itl]),
        "e2el": stats([r.latency for r in done]),
    }


def print_table(summary: dict, config: dict) -> None:
    rate = "inf" if config["request_rate"] == float("inf") else config["request_rate"]
    print(f"{'=' * 16} kiln serving benchmark {'=' * 16}")
    print(f"request rate {rate}/s, max concurrency {config['max_concurrency'] or '-'}, "
          f"input ~{config['input_len']} / output ~{config['output_len']} tokens, {config['num_prompts']} prompts")
    rows = [("Successful requests", summary["completed"]), ("Failed requests", summary["failed"]),
            ("Benchmark duration (s)", summary["duration_s"]), ("Total input tokens", summary["total_input_tokens"]),
            ("Total generated tokens", summary["total_output_tokens"]),
            ("Request throughput (req/s)", summary["request_throughput_per_s"]),
            ("Output token throughput (tok/s)", summary["output_token_throughput_per_s"]),
            ("Total token throughput (tok/s)", summary["total_token_throughput_per_s"])]
    for name, value in rows:
        print(f"{name:<36}{value:>12.2f}" if isinstance(value, float) else f"{name:<36}{value:>12}")
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print(f"{'-' * 14} {title} {'-' * 14}")
        for stat, value in summary[key].items():
            label = stat.replace("_ms", "").replace("mean", "Mean").replace("p", "P", 1)
            print(f"{label + ' (ms)':<36}{value:>12.2f}" if value is not None else f"{label + ' (ms)':<36}{'-':>12}")
    for error in summary["errors"]:
        print(f"error: {error}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def kiln_server(args, artifact: str):
    """`kiln serve artifact` on a free loopback port; yields its URL; stopped with SIGINT."""
    port = free_port()
    command = [sys.executable, "-m", "kiln.cli", "serve", artifact, "--port", str(port), "--served-model-name",
               args.model, "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-memory", str(args.kv_cache_memory)]
    log_path = Path(args.output).with_suffix(".server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"kiln serve exited ({proc.returncode}); see {log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"kiln serve did not become healthy in 300 s; see {log_path}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model or artifact to serve (or the served name)")
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    parser.add_argument("--api-key")
    parser.add_argument("--vocab-size", type=int, help="with --url: the model's vocabulary size (prompt token ids)")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    parser.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len * [1 - r, 1 + r]")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="for the server this script starts")
    parser.add_argument("--kv-cache-memory", type=int, default=1024, metavar="MIB", help="for the server it starts")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = parser.parse_args()
    if not 0 <= args.range_ratio < 1:
        parser.error("--range-ratio must be in [0, 1)")

    if args.url:
        if args.vocab_size is None:
            parser.error("--url needs --vocab-size (prompts are random token ids)")
        requests = sample_requests(args, args.vocab_size)
        results, duration = asyncio.run(run(args, args.url, args.model, requests))
    else:
        from kiln.llm import open_artifact

        artifact = open_artifact(args.model)
        requests = sample_requests(args, artifact.manifest["vocab_size"])
        with kiln_server(args, str(artifact.path)) as url:
            results, duration = asyncio.run(run(args, url, args.model, requests))

    config = {k: v for k, v in vars(args).items() if k != "api_key"}
    summary = summarize(results, duration)
    print_table(summary, config)
    record = {"benchmark": "serve", "config": {**config, "request_rate": str(args.request_rate)},
              "machine": machine(), "summary": summary, "requests": [asdict(r) for r in results]}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
