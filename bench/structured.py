"""The cost of structured output per step: the sampler's grammar mask (runtime/structured_output.py,
llguidance) over a batch of constrained rows with SmolLM2's 49k-token vocabulary, at batch 1, 16
and 64, each row somewhere inside a JSON-schema reply (rows are walked a random number of tokens
in first, so they sit in strings, numbers, keys and arrays). Per batch size: the median over
`runs` steps of the mask (fill + apply) and of feeding the drawn tokens back.

    python bench/structured.py [--runs 50] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_description, write_results

from kiln.frontend import load_checkpoint
from kiln.runtime import structured_output
from kiln.runtime.sampling_params import StructuredOutput

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}}},
    "required": ["name", "age", "tags", "address"]}
VOCAB = 49152


def walk(matchers: list, steps: list[int], generator: torch.Generator) -> None:
    """Feeds each matcher steps[i] tokens drawn under its mask (from random logits)."""
    for matcher, count in zip(matchers, steps):
        for _ in range(count):
            logits = torch.randn(1, VOCAB, generator=generator)
            structured_output.mask(logits, [0], [matcher])
            structured_output.accept([matcher], [int(logits.argmax())])


def bench(batch: int, runs: int, grammars: structured_output.Grammars) -> dict:
    generator = torch.Generator().manual_seed(batch)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    matchers = [grammars.matcher(spec) for _ in range(batch)]
    walk(matchers, torch.randint(0, 12, (batch,), generator=generator).tolist(), generator)
    masks, accepts = [], []
    for _ in range(runs):
        logits = torch.randn(batch, VOCAB, generator=generator)
        start = time.perf_counter()
        structured_output.mask(logits, list(range(batch)), matchers)
        masks.append(time.perf_counter() - start)
        tokens = logits.argmax(-1).tolist()
        start = time.perf_counter()
        structured_output.accept(matchers, tokens)
        accepts.append(time.perf_counter() - start)
        for i, matcher in enumerate(matchers):  # a finished reply starts again, as a new request would
            if structured_output.is_finished(matcher):
                matchers[i] = grammars.matcher(spec)
    mask_ms, accept_ms = 1e3 * statistics.median(masks), 1e3 * statistics.median(accepts)
    return {"mask_ms": round(mask_ms, 3), "accept_ms": round(accept_ms, 3), "mask_us_per_row": round(1e3 * mask_ms / batch, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "structured.json")
    args = parser.parse_args()
    tokenizer = load_checkpoint("smollm2-135m", progress=False).tokenizer
    grammars = structured_output.Grammars(tokenizer, VOCAB, frozenset([2]))
    results = {"machine": cpu_description(), "threads": torch.get_num_threads(), "vocab": VOCAB,
               "batches": {str(b): bench(b, args.runs, grammars) for b in (1, 16, 64)}}
    for batch, row in results["batches"].items():
        print(f"batch {batch:>3}: mask {row['mask_ms']:.3f} ms ({row['mask_us_per_row']} us a row), "
              f"accept {row['accept_ms']:.3f} ms")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
