"""Agents that pause: N simulated agents, each a conversation of many turns over a growing shared
history, whose every turn ends in a JSON tool call (structured output). Between two turns of an
agent, other traffic (unrelated long prompts) fills the KV pool, as the time an agent spends on a
tool, a sandbox or a human lets other users in; the pauses are scaled down to that traffic, not
slept. Run side by side on SmolLM2-135M (cpu target, one engine each) with the prefix cache's
host tier and without it. Reported: per turn, the TTFT and the history tokens recomputed (what the
cache no longer held), averaged over the agents; totals; and the grammar mask's cost per step.

    python bench/agent.py [--agents 3] [--turns 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_description, write_results

from kiln.llm import LLM
from kiln.runtime import structured_output
from kiln.runtime.sampling_params import SamplingParams, StructuredOutput

MODEL = "smollm2-135m"
KV_POOL = 96 << 20  # ~2,180 tokens of SmolLM2 KV: not the agents' histories and the other traffic together
HOST_TIER = 512 << 20
SYSTEM, MESSAGE, OTHER = 128, 24, 768  # tokens: shared history at the start, a new message, other traffic
TOOL_CALL = StructuredOutput("json_schema", json.dumps({
    "type": "object", "properties": {"name": {"enum": ["search", "run_code", "ask_user"]},
                                     "arguments": {"type": "object", "properties": {"query": {"type": "string",
                                                                                              "maxLength": 24}},
                                                   "required": ["query"], "additionalProperties": False}},
    "required": ["name", "arguments"], "additionalProperties": False}))


class MaskTimer:
    """Times the sampler's grammar mask (runtime/structured_output.mask) while installed."""

    def __init__(self):
        self.seconds: list[float] = []
        self._mask = structured_output.mask

    def __enter__(self) -> MaskTimer:
        def timed(*args):
            start = time.perf_counter()
            self._mask(*args)
            self.seconds.append(time.perf_counter() - start)

        structured_output.mask = timed
        return self

    def __exit__(self, *exc) -> None:
        structured_output.mask = self._mask


def run(llm: LLM, agents: int, turns: int, label: str) -> dict:
    """Every agent takes `turns` turns, round-robin, with other traffic after each turn."""
    rng = random.Random(0)
    words = lambda n: [rng.randrange(100, 40000) for _ in range(n)]  # noqa: E731
    histories = [words(SYSTEM) for _ in range(agents)]
    params = SamplingParams(max_tokens=64, temperature=0.0, structured_output=TOOL_CALL)
    other = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([words(8)], params)  # the grammar's first use compiles llguidance's mask kernel
    ttft = [[0.0] * agents for _ in range(turns)]
    recomputed = [[0] * agents for _ in range(turns)]
    outputs = []
    for turn in range(turns):
        for agent in range(agents):
            message = words(MESSAGE)
            before = llm.engine.stats().prompt_tokens_computed
            [out] = llm.generate([histories[agent] + message], params)
            recomputed[turn][agent] = llm.engine.stats().prompt_tokens_computed - before - MESSAGE
            ttft[turn][agent] = out.metrics.first_token_time - out.metrics.arrival_time
            histories[agent] += message + list(out.outputs[0].token_ids)
            outputs.append(list(out.outputs[0].token_ids))
            llm.generate([words(OTHER)], other)
        print(f"{label}: turn {turn + 1}/{turns}: TTFT {1e3 * statistics.mean(ttft[turn]):.0f} ms, recomputed "
              f"{statistics.mean(recomputed[turn]):.0f} of {len(histories[0]) - MESSAGE} history tokens", flush=True)
    stats = llm.engine.stats()
    return {"ttft_ms_per_turn": [round(1e3 * statistics.mean(t), 1) for t in ttft],
            "recomputed_per_turn": [round(statistics.mean(r), 1) for r in recomputed],
            "history_tokens_at_end": statistics.mean(len(h) for h in histories),
            "recomputed_total": sum(map(sum, recomputed)),
            "ttft_ms_mean_after_first_turn": round(1e3 * statistics.mean(x for t in ttft[1:] for x in t), 1),
            "ttft_ms_median_after_first_turn": round(1e3 * statistics.median(x for t in ttft[1:] for x in t), 1),
            "host_hit_tokens": stats.prefix_cache_host_hit_tokens, "outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "agent.json")
    args = parser.parse_args()
    results: dict = {"machine": cpu_description(), "threads": torch.get_num_threads(), "model": MODEL,
                     "kv_pool_mib": KV_POOL >> 20, "host_tier_mib": HOST_TIER >> 20, "agents": args.agents,
                     "turns": args.turns}
    with MaskTimer() as masks:
        for label, host in (("host tier", HOST_TIER), ("no tier", 0)):
            llm = LLM(MODEL, kv_cache_memory=KV_POOL, max_model_len=2048, host_cache_memory=host, progress=False)
            results[label] = run(llm, args.agents, args.turns, label)
            del llm
    tier, plain = results["host tier"], results["no tier"]
    results["same_outputs"] = tier.pop("outputs") == plain.pop("outputs")
    results["grammar_mask_ms_per_step"] = round(1e3 * statistics.median(masks.seconds), 3)
    print(f"history recomputed: {tier['recomputed_total']} tokens with the host tier, {plain['recomputed_total']} "
          f"without; TTFT after the first turn: median {tier['ttft_ms_median_after_first_turn']:.0f} vs "
          f"{plain['ttft_ms_median_after_first_turn']:.0f} ms, mean {tier['ttft_ms_mean_after_first_turn']:.0f} vs "
          f"{plain['ttft_ms_mean_after_first_turn']:.0f} ms; same outputs: {results['same_outputs']}; grammar mask "
          f"{results['grammar_mask_ms_per_step']} ms a step (median of {len(masks.seconds)})")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
