"""LLMEngine end to end over the paging toy executor, against unpaged, unbatched greedy decoding."""

import random

import pytest

from kiln.errors import KilnError
from kiln.runtime.sampling_params import SamplingParams


def _prompts(n: int, seed: int, lo: int = 3, hi: int = 60, vocab: int = 400) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _mixed_requests(num: int, seed: int):
    rng = random.Random(seed)
    return [(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=rng.randint(1, 24)))
            for i, prompt in enumerate(_prompts(num, seed))]


def test_batched_greedy_equals_each_request_alone(make_engine, greedy_reference, run):
    requests = _mixed_requests(32, seed=1)
    arrivals: dict[int, list] = {}
    for i, request in enumerate(requests):
        arrivals.setdefault(i // 3, []).append(request)  # a few new requests every step
    engine = make_engine(max_num_batched_tokens=64, max_num_seqs=16)
    finals = run(engine, arrivals)
    assert engine.executor.max_step_tokens <= 64 and engine.executor.max_step_seqs <= 16
    for request_id, prompt, params in requests:
        alone = run(make_engine(), {0: [(request_id, prompt, params)]})[request_id]
        expected = greedy_reference(prompt, params)
        assert list(alone.outputs[0].token_ids) == expected
        assert list(finals[request_id].outputs[0].token_ids) == expected, request_id


def test_preemption_under_a_tiny_kv_budget_changes_nothing(make_engine, greedy_reference, run):
    requests = _mixed_requests(12, seed=2)
    longest = max(len(p) + s.max_tokens for _, p, s in requests)
    engine = make_engine(num_blocks=-(-longest // 4) + 2, block_size=4, max_num_batched_tokens=32)
    finals = run(engine, {0: requests})
    assert engine.stats().num_preemptions > 0
    for request_id, prompt, params in requests:
        assert list(finals[request_id].outputs[0].token_ids) == greedy_reference(prompt, params)
    stats = engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.parametrize("block_size", [4, 16])
def test_shared_prefix_is_computed_once(make_engine, greedy_reference, run, block_size):
    system = _prompts(1, seed=3, lo=200, hi=200)[0]
    first, second = system + [5, 6, 7], system + [8, 9]
    params = SamplingParams(temperature=0, max_tokens=6)
    engine = make_engine(block_size=block_size)
    run(engine, {0: [("a", first, params)]})
    before = engine.stats().prompt_tokens_computed
    assert before == len(first)
    out = run(engine, {0: [("b", second, params)]})["b"]
    computed = engine.stats().prompt_tokens_computed - before
    assert computed <= 0.1 * len(second), computed
    assert engine.stats().prefix_cache_hit_tokens == len(second) - computed
    assert list(out.outputs[0].token_ids) == greedy_reference(second, params)


def test_prefix_caching_off_computes_everything(make_engine, run):
    prompt = _prompts(1, seed=4, lo=40, hi=40)[0]
    engine = make_engine(enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=2)
    run(engine, {0: [("a", prompt, params)], 1: [("b", prompt, params)]})
    assert engine.stats().prompt_tokens_computed == 2 * len(prompt)
    assert engine.stats().prefix_cache_hit_tokens == 0


def _step_until(engine, predicate, limit=200):
    for _ in range(limit):
        if predicate():
            return
        engine.step()
    raise AssertionError("condition never reached")


@pytest.mark.parametrize("moment", ["waiting", "mid_prefill", "mid_decode", "finished"])
def test_abort_and_finish_return_every_block(make_engine, run, moment):
    engine = make_engine(num_blocks=64, max_num_batched_tokens=8)
    free_at_start = engine.stats().kv_blocks_free
    prompt = _prompts(1, seed=5, lo=30, hi=30)[0]
    engine.add_request("other", _prompts(1, seed=6)[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.add_request("x", prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    seq = engine._requests["x"].completions[0].seq
    conditions = {
        "waiting": lambda: True,
        "mid_prefill": lambda: 0 < seq.num_computed_tokens < len(prompt),
        "mid_decode": lambda: seq.num_output_tokens >= 3,
        "finished": lambda: seq.is_finished,
    }
    _step_until(engine, conditions[moment])
    engine.abort("x")
    final = [o for o in engine.step() if o.request_id == "x"]
    if moment != "finished":
        assert final and final[0].finished and final[0].outputs[0].finish_reason == "abort"
    assert engine.kv.block_ids(seq.seq_id) == []
    run(engine)
    stats = engine.stats()
    assert stats.kv_blocks_free == free_at_start and stats.kv_blocks_used == 0
    assert not engine.has_unfinished_requests()


def test_streamed_deltas_add_up_and_stats_count(make_engine, greedy_reference):
    engine = make_engine()
    prompts = _prompts(3, seed=7)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"s{i}", prompt, params)
    texts, tokens, finals = {}, {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            completion = out.outputs[0]
            texts[out.request_id] = texts.get(out.request_id, "") + completion.delta_text
            tokens[out.request_id] = tokens.get(out.request_id, ()) + completion.delta_token_ids
            assert completion.text.startswith(texts[out.request_id])
            if out.finished:
                finals[out.request_id] = out
    for i, prompt in enumerate(prompts):
        out = finals[f"s{i}"]
        completion = out.outputs[0]
        assert texts[f"s{i}"] == completion.text == engine.tokenizer.decode(list(completion.token_ids))
        assert list(tokens[f"s{i}"]) == list(completion.token_ids) == greedy_reference(prompt, params)
        assert completion.finish_reason == "length" and len(completion.logprobs) == 12
        assert [lp.token_id for lp in completion.logprobs] == list(completion.token_ids)
        m = out.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time and m.num_generation_tokens == 12
    stats = engine.stats()
    assert stats.generation_tokens == 36
    assert stats.prompt_tokens_computed == sum(map(len, prompts))
    assert stats.num_running == stats.num_waiting == 0


def test_n_completions_share_the_prompt_blocks(make_engine, run):
    prompt = _prompts(1, seed=8, lo=64, hi=64)[0]
    engine = make_engine(block_size=4)
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    out = run(engine, {0: [("n", prompt, params)]})["n"]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({c.token_ids for c in out.outputs}) == 4, "siblings with seeds seed+k should differ"
    assert engine.stats().prompt_tokens_computed <= len(prompt) + 3 * 4
    alone = run(make_engine(), {0: [("m", prompt, params)]})["m"]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in out.outputs]


def test_stop_token_ends_the_output(make_engine, greedy_reference, run):
    prompt = _prompts(1, seed=9)[0]
    free_run = greedy_reference(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    stop_id = free_run[5]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id])
    out = run(make_engine(), {0: [("t", prompt, params)]})["t"].outputs[0]
    cut = free_run.index(stop_id) + 1
    assert list(out.token_ids) == free_run[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.text == make_engine().tokenizer.decode(free_run[:cut - 1])


def test_eos_ends_the_output_unless_ignored(make_engine, greedy_reference, run):
    prompt = _prompts(1, seed=10)[0]
    free_run = greedy_reference(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    eos = free_run[4]
    cut = free_run.index(eos) + 1
    out = run(make_engine(eos_token_ids=[eos]), {0: [("e", prompt, SamplingParams(temperature=0, max_tokens=20))]})
    completion = out["e"].outputs[0]
    assert list(completion.token_ids) == free_run[:cut]
    assert completion.finish_reason == "stop" and completion.stop_reason is None
    ignoring = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    out = run(make_engine(eos_token_ids=[eos]), {0: [("i", prompt, ignoring)]})["i"].outputs[0]
    assert list(out.token_ids) == free_run and out.finish_reason == "length"


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "empty"),
    ([1] * 512, SamplingParams(), "no room"),
    ([1] * 500, SamplingParams(max_tokens=20), "max_tokens"),
    ([1, 5000], SamplingParams(), r"\[0, 400\)"),
    ([1, 2], SamplingParams(max_tokens=None, stop_token_ids=[999]), "stop_token_ids"),
])
def test_add_request_rejects_bad_requests(make_engine, prompt, params, match):
    with pytest.raises(KilnError, match=match):
        make_engine(max_model_len=512).add_request("bad", prompt, params)


def test_request_larger_than_the_kv_pool_is_rejected(make_engine):
    engine = make_engine(num_blocks=8, block_size=4)
    with pytest.raises(KilnError, match="32 tokens the KV cache holds"):
        engine.add_request("big", [1] * 30, SamplingParams(max_tokens=8))
    engine.add_request("fits", [1] * 30, SamplingParams(max_tokens=None))
    assert engine._requests["fits"].completions[0].seq.max_tokens == 2


def test_duplicate_request_id_is_rejected(make_engine):
    engine = make_engine()
    engine.add_request("a", [1, 2, 3])
    with pytest.raises(KilnError, match="already in use"):
        engine.add_request("a", [1, 2, 3])


def test_seeded_sampling_is_reproducible_in_any_batch(make_engine, run):
    prompt = _prompts(1, seed=11)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=77, max_tokens=16, ignore_eos=True)
    alone = run(make_engine(), {0: [("x", prompt, params)]})["x"].outputs[0]
    others = [(f"o{i}", p, SamplingParams(temperature=1.0, max_tokens=8)) for i, p in enumerate(_prompts(12, seed=12))]
    engine = make_engine(num_blocks=30, max_num_batched_tokens=16)
    crowded = run(engine, {0: others[:6], 2: [("x", prompt, params)] + others[6:]})["x"].outputs[0]
    assert engine.stats().num_preemptions > 0
    assert crowded.token_ids == alone.token_ids and crowded.text == alone.text
    other = SamplingParams(temperature=0.9, top_p=0.95, seed=78, max_tokens=16, ignore_eos=True)
    assert run(make_engine(), {0: [("y", prompt, other)]})["y"].outputs[0].token_ids != alone.token_ids


def test_outputs_keep_their_step_when_read_later(make_engine):
    """Outputs share the engine's append-only token and logprob lists instead of copying them:
    one read after later steps still shows its own step, and the deltas add up to the final."""
    engine = make_engine()
    prompts = _prompts(2, seed=13)
    engine.add_request("a", prompts[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1))
    engine.add_request("b", prompts[1], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True,
                                                       logprobs=0))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()  # nothing is read until the end
    for request_id, prompt in zip("ab", prompts):
        mine = [o for o in outputs if o.request_id == request_id]
        final = mine[-1]
        assert final.finished and not any(o.finished for o in mine[:-1])
        for index, completion in enumerate(final.outputs):
            seen = [o.outputs[index] for o in mine]
            lengths = [len(c.token_ids) for c in seen]
            assert lengths == sorted(lengths) and lengths[-1] == len(completion.logprobs)
            for c in seen:
                assert c.index == index and c.token_ids == completion.token_ids[:len(c.token_ids)]
                assert c.logprobs == completion.logprobs[:len(c.token_ids)] and completion.text.startswith(c.text)
            assert sum((c.delta_token_ids for c in seen), ()) == completion.token_ids
            assert sum((c.delta_logprobs for c in seen), ()) == completion.logprobs
            assert "".join(c.delta_text for c in seen) == completion.text
        metrics = final.metrics
        assert metrics.num_prompt_tokens == len(prompt) == len(final.prompt_token_ids)
        assert metrics.num_generation_tokens == sum(len(c.token_ids) for c in final.outputs)
    assert [len(o.outputs[0].token_ids) for o in outputs if o.request_id == "a"] == list(range(1, 11))
