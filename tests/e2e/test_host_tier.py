"""The prefix cache's host tier end to end (tiny random Llama on the cpu target): two
conversations whose histories do not fit the KV pool together take turns. With the tier, each
turn recomputes at most one block of its history (the rest is copied back from host memory);
without it, most of the history; the tokens are the same either way, and /metrics counts the
hits per tier. A request's cache_ttl keeps its prefix in a small tier that other traffic
cycles through."""

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.errors import KilnError
from kiln.llm import LLM
from kiln.runtime import kv_groups, kv_tiers
from kiln.runtime.metrics import ServerMetrics
from kiln.runtime.sampling_params import SamplingParams

POOL_BLOCKS = 20  # one conversation at its longest (~290 tokens) fits, two do not
TURNS, HISTORY, NEW, OUT = 6, 100, 24, 8


@pytest.fixture(scope="module")
def block_bytes(tiny_model_dir) -> int:
    probe = LLM(str(tiny_model_dir), kv_cache_memory=1 << 20, max_model_len=256, progress=False)
    assert probe.executor.block_size == 16
    return kv_groups.block_bytes(probe.executor.cache_groups)


def _llm(path, block_bytes: int, host_blocks: int) -> LLM:
    return LLM(str(path), kv_cache_memory=POOL_BLOCKS * block_bytes, max_model_len=POOL_BLOCKS * 16,
               host_cache_memory=host_blocks * block_bytes, progress=False)


def _alternate(llm: LLM) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Conversations A and B, turn by turn: each turn's greedy tokens, and (history length, history
    tokens recomputed) per turn, where the history is everything before the turn's new tokens."""
    rng = random.Random(0)
    history = {c: [rng.randrange(3, 40000) for _ in range(HISTORY)] for c in "AB"}
    outputs, recomputed = [], []
    params = SamplingParams(max_tokens=OUT, temperature=0.0, ignore_eos=True)
    for _ in range(TURNS):
        for c in "AB":
            new = [rng.randrange(3, 40000) for _ in range(NEW)]
            before = llm.engine.stats().prompt_tokens_computed
            [out] = llm.generate([history[c] + new], params)
            recomputed.append((len(history[c]), llm.engine.stats().prompt_tokens_computed - before - NEW))
            outputs.append(list(out.outputs[0].token_ids))
            history[c] += new + outputs[-1]
    return outputs, recomputed


def test_alternating_conversations_copy_their_history_back(tiny_model_dir, block_bytes):
    tiered = _llm(tiny_model_dir, block_bytes, host_blocks=64)
    with_tier, tier_recomputed = _alternate(tiered)
    without_tier, plain_recomputed = _alternate(_llm(tiny_model_dir, block_bytes, host_blocks=0))
    assert with_tier == without_tier
    later = slice(2, None)  # each conversation's first turn computes everything either way
    assert all(recomputed <= 16 for _, recomputed in tier_recomputed[later]), tier_recomputed
    assert all(recomputed > 0.75 * length for length, recomputed in plain_recomputed[-2:]), plain_recomputed
    assert sum(r for _, r in plain_recomputed[later]) > 10 * sum(r for _, r in tier_recomputed[later])
    stats = tiered.engine.stats()
    assert stats.prefix_cache_host_hit_tokens >= 16 * 10 and stats.host_blocks_used > POOL_BLOCKS
    samples = {(s.name, s.labels.get("tier")): s.value
               for family in text_string_to_metric_families(ServerMetrics(tiered.engine.stats).render().decode())
               for s in family.samples}
    assert samples[("kiln_prefix_cache_tier_hits_total", "host")] == stats.prefix_cache_host_hit_tokens
    assert samples[("kiln_prefix_cache_tier_hits_total", "device")] == \
        stats.prefix_cache_hit_tokens - stats.prefix_cache_host_hit_tokens > 0
    assert samples[("kiln_host_cache_blocks_total", None)] == 64


def test_a_tier_larger_than_the_free_memory_is_refused(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(kv_tiers, "_available_memory", lambda: 3 << 30)
    with pytest.raises(KilnError, match=r"asks for 4.00 GiB but this machine has 3.00 GiB"):
        LLM(str(tiny_model_dir), kv_cache_memory=1 << 20, max_model_len=256, host_cache_memory=4 << 30, progress=False)


def test_cache_ttl_keeps_a_prefix_in_the_tier_through_other_traffic(tiny_model_dir, block_bytes):
    llm = _llm(tiny_model_dir, block_bytes, host_blocks=8)
    rng = random.Random(1)
    agent = [rng.randrange(3, 40000) for _ in range(97)]  # 6 full blocks
    greedy = SamplingParams(max_tokens=1, temperature=0.0)

    def computed_again(ttl: float | None) -> int:
        llm.generate([agent], SamplingParams(max_tokens=1, temperature=0.0, cache_ttl=ttl))
        for _ in range(3):  # traffic that passes through the pool and the tier
            llm.generate([[rng.randrange(3, 40000) for _ in range(300)]], greedy)
        before = llm.engine.stats().prompt_tokens_computed
        llm.generate([agent], greedy)
        return llm.engine.stats().prompt_tokens_computed - before

    assert computed_again(None) == len(agent)  # the traffic evicted it from both tiers
    assert computed_again(3600.0) == 1  # only the last token: 96 copied back from the tier
    with pytest.raises(KilnError, match="host tier"):
        _llm(tiny_model_dir, block_bytes, host_blocks=0).engine.add_request("x", agent, SamplingParams(cache_ttl=5.0))
