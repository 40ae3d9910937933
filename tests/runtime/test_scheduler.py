"""Scheduler policies, step by step, and a Hypothesis property check of the whole engine loop."""

import random

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.request import SeqStatus, Sequence
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)


def _scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=16, prefix=True):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     eos_token_ids=frozenset([0]))


def _add(sched, name, prompt_len, params=GREEDY):
    seq = Sequence((name, 0), list(range(1, prompt_len + 1)), params, params.max_tokens, arrival_time=0.0)
    sched.add(seq)
    return seq


def _step(sched, token=7):
    """schedule + update, sampling `token` for every sequence that caught up."""
    out = sched.schedule()
    sampled = {c.seq.seq_id: token for c in out.chunks if c.completes}
    sched.update_from_output(out, sampled)
    return out


def test_long_prompt_is_chunked_and_decodes_go_first():
    sched = _scheduler(max_num_batched_tokens=16)
    short = _add(sched, "short", 3)
    long = _add(sched, "long", 40)
    first = _step(sched)
    assert [(c.seq.seq_id[0], c.num_new_tokens) for c in first.chunks] == [("short", 3), ("long", 13)]
    second = _step(sched)
    assert [(c.seq.seq_id[0], c.start, c.num_new_tokens) for c in second.chunks] == [("short", 3, 1), ("long", 13, 15)]
    assert second.num_decodes == 1 and short.num_output_tokens == 2 and long.num_output_tokens == 0
    third = _step(sched)
    assert [(c.seq.seq_id[0], c.num_new_tokens) for c in third.chunks] == [("short", 1), ("long", 12)]
    assert long.num_output_tokens == 1 and long.num_computed_tokens == 40
    fourth = _step(sched)
    assert [c.num_new_tokens for c in fourth.chunks] == [1, 1] and fourth.num_decodes == 2


def test_sequence_budget_and_fcfs_admission():
    sched = _scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [_add(sched, f"s{i}", 5) for i in range(4)]
    out = _step(sched)
    assert [c.seq for c in out.chunks] == seqs[:2] and len(sched.waiting) == 2
    sched.finish(seqs[0], "abort")
    out = _step(sched)
    assert {c.seq.seq_id[0] for c in out.chunks} == {"s1", "s2"} and list(sched.waiting) == [seqs[3]]


def test_waiting_head_that_does_not_fit_blocks_the_queue():
    sched = _scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=100)
    _add(sched, "a", 12)  # 3 blocks
    big = _add(sched, "big", 16)  # 4 blocks: does not fit next to a
    small = _add(sched, "small", 2)
    _step(sched)
    assert big.status is SeqStatus.WAITING and small.status is SeqStatus.WAITING


def test_newest_running_sequence_is_preempted_and_recomputed():
    sched = _scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=100)
    old = _add(sched, "old", 7)
    new = _add(sched, "new", 7)
    _step(sched)  # both prefilled: 2 blocks each, pool full
    assert old.num_tokens == new.num_tokens == 8
    out = _step(sched)  # both decode at position 7 (still inside block 1)
    assert out.preempted == []
    out = _step(sched)  # position 8 needs a third block for old: new is preempted
    assert out.preempted == [new] and [c.seq for c in out.chunks] == [old]
    assert new.status is SeqStatus.WAITING and new.num_computed_tokens == 0 and sched.kv.block_ids(new.seq_id) == []
    assert sched.num_preemptions == 1 and new.output_token_ids == [7, 7]
    sched.finish(old, "abort")
    out = _step(sched)  # new comes back: its 9 tokens' first 2 blocks are cached (old computed them too)
    assert [(c.seq, c.start, c.num_new_tokens) for c in out.chunks] == [(new, 8, 1)]
    assert new.output_token_ids == [7, 7, 7]


def test_prefix_hit_skips_computed_tokens_but_not_the_last():
    sched = _scheduler(max_num_batched_tokens=100)
    a = _add(sched, "a", 12)
    _step(sched)
    sched.finish(a, "abort")
    b = _add(sched, "b", 12)
    out = _step(sched)
    assert [(c.start, c.num_new_tokens) for c in out.chunks] == [(8, 4)]
    assert b.num_output_tokens == 1 and sched.kv.prefix_hit_tokens == 8


def _engine_with_checks(make_engine, **kw):
    """An engine whose executor asserts the budgets and that no written block is shared."""
    engine = make_engine(**kw)
    inner = engine.executor.execute

    def execute(batch):
        assert batch.num_tokens <= engine.scheduler.max_num_batched_tokens
        assert batch.num_seqs <= engine.scheduler.max_num_seqs
        assert len(engine.scheduler.running) <= engine.scheduler.max_num_seqs
        written = {int(s) // engine.kv.block_size for s in batch.slot_mapping.tolist() if s >= 0}
        owners: dict[int, int] = {}
        for seq in engine.scheduler.running:
            for block in engine.kv.block_ids(seq.seq_id):
                owners[block] = owners.get(block, 0) + 1
        assert all(owners.get(b) == 1 for b in written), "a step writes a KV block that is shared"
        for block, count in owners.items():
            assert engine.kv.pool.ref_count(block) == count
        return inner(batch)

    engine.executor.execute = execute
    return engine


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), spare_blocks=st.integers(0, 4), block_size=st.sampled_from([2, 4, 8]),
       max_num_seqs=st.integers(1, 8), max_num_batched_tokens=st.integers(1, 40), prefix=st.booleans())
def test_engine_loop_property(make_engine, greedy_reference, run, seed, spare_blocks, block_size, max_num_seqs,
                              max_num_batched_tokens, prefix):
    rng = random.Random(seed)
    num_blocks = -(-32 // block_size) + spare_blocks  # the longest request (12 + 10 + 10 tokens) fits
    shared = [rng.randrange(2, 400) for _ in range(rng.randint(0, 12))]
    requests, arrivals = [], {}
    for i in range(rng.randint(1, 10)):
        prompt = shared + [rng.randrange(2, 400) for _ in range(rng.randint(1, 10))]
        params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 10))
        requests.append((f"r{i}", prompt, params))
        arrivals.setdefault(rng.randint(0, 6), []).append(requests[-1])
    engine = _engine_with_checks(make_engine, num_blocks=num_blocks, block_size=block_size, max_model_len=64,
                                 max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                 enable_prefix_caching=prefix)
    finals = run(engine, arrivals)
    for request_id, prompt, params in requests:
        assert list(finals[request_id].outputs[0].token_ids) == greedy_reference(prompt, params)
    stats = engine.stats()
    assert stats.kv_blocks_free == num_blocks and stats.num_running == stats.num_waiting == 0
    event(f"preempted: {stats.num_preemptions > 0}")
    event(f"prefix hits: {stats.prefix_cache_hit_tokens > 0}")
