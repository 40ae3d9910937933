"""The cpu target's ops (runtime/cpu_ops.py) against the IR's reference semantics (ir/reference.py)
(attention with windows, block-sparse layouts, sinks and softcap, never reading the KV pages no
query sees; long contexts in key blocks), the CpuExecutor's thread count per step and when it hands
freed heap back to the OS."""

import pytest
import torch

from kiln.ir import reference
from kiln.ir.specs import AttentionKind, AttentionSpec, BlockSparseLayout, RopeSpec
from kiln.runtime import cpu_ops, executor
from kiln.runtime.executor import HeapTrim, OtherLoad, step_threads

H, HKV, D, BS = 6, 2, 16, 4


def _paged(seq_lens: list[int], q_lens: list[int], seed: int = 0, heads: int = H):
    """q [T, heads, D] and k/v caches [NB, BS, HKV, D] holding each sequence's context in shuffled
    blocks, with the step inputs that address them."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // BS) for n in seq_lens]
    ids = (torch.randperm(sum(blocks) + 3, generator=g) + 1).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    for b, n in enumerate(blocks):
        tables[b, :n] = torch.tensor(ids[:n])
        ids = ids[n:]
    caches = [torch.randn(sum(blocks) + 4, BS, HKV, D, generator=g) for _ in range(2)]
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), heads, D, generator=g)
    return q, *caches, query_start, torch.tensor(seq_lens, dtype=torch.int32), tables


@pytest.mark.parametrize("window, softcap", [(None, None), (5, None), (None, 30.0)])
def test_prefill_attention_matches_reference(window, softcap):
    # two decodes first (as the scheduler orders them), a chunk with a cached prefix, a whole prompt
    q, k_cache, v_cache, query_start, seq_lens, tables = _paged([9, 3, 13, 7], [1, 1, 5, 7])
    kind = AttentionKind.DENSE if window is None else AttentionKind.SLIDING_WINDOW
    spec = AttentionSpec(kind=kind, num_heads=H, num_kv_heads=HKV, head_dim=D, window=window, softcap=softcap)
    got = cpu_ops.prefill_attention(q, k_cache, v_cache, query_start, seq_lens, tables,
                                    scale=spec.effective_scale, window=window, softcap=softcap)
    want = reference.paged_attention(q, k_cache, v_cache, query_start, seq_lens, tables, spec)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, softcap", [(None, None), (4, None), (None, 30.0)])
@pytest.mark.parametrize("seq_lens", [[13], [9, 1, 17], [9, 1, 17, 30, 2, 5, 12, 8, 21, 3, 16]])  # no mask, one group, two
def test_decode_attention_matches_reference(window, softcap, seq_lens):
    q, k_cache, v_cache, query_start, seq_lens, tables = _paged(seq_lens, [1] * len(seq_lens))
    kind = AttentionKind.DENSE if window is None else AttentionKind.SLIDING_WINDOW
    spec = AttentionSpec(kind=kind, num_heads=H, num_kv_heads=HKV, head_dim=D, window=window, softcap=softcap)
    got = cpu_ops.decode_attention(q, k_cache, v_cache, seq_lens, tables, scale=spec.effective_scale,
                                   window=window, softcap=softcap)
    want = reference.paged_attention(q, k_cache, v_cache, query_start, seq_lens, tables, spec)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _spec(window=None, layout=None, softcap=None, sinks=False, heads=H) -> AttentionSpec:
    kind = AttentionKind.BLOCK_SPARSE if layout else AttentionKind.SLIDING_WINDOW if window else AttentionKind.DENSE
    return AttentionSpec(kind, heads, HKV, D, window=window, softcap=softcap, sinks=sinks, block_sparse=layout)


def _options(spec: AttentionSpec, sinks: torch.Tensor | None) -> dict:
    """cpu_ops' keyword arguments for `spec` (as codegen/cpu.py emits them)."""
    layout = spec.block_sparse
    return dict(scale=spec.effective_scale, window=spec.window, softcap=spec.softcap, sinks=sinks,
                layout=None if layout is None else (layout.block_size, layout.local_blocks, layout.vertical_stride))


def _hide_unseen_pages(k_cache, v_cache, query_start, seq_lens, tables, spec):
    """Caches with one more page, of NaN, and tables whose entries for the pages that no query of
    their sequence sees point at it (as a released block's entry points at another sequence's page)."""
    nan_page = k_cache.shape[0]
    k_cache, v_cache = (torch.cat([c, torch.full_like(c[:1], float("nan"))]) for c in (k_cache, v_cache))
    tables = tables.clone()
    hidden = 0
    for b, length in enumerate(seq_lens.tolist()):
        positions = torch.arange(length)
        seen = reference.attention_mask(positions[int(query_start[b]) - int(query_start[b + 1]):], positions, spec)
        unseen = ~torch.nn.functional.pad(seen.any(0), (0, -length % BS)).view(-1, BS).any(1)
        tables[b, : len(unseen)][unseen] = nan_page
        hidden += int(unseen.sum())
    return k_cache, v_cache, tables, hidden


LAYOUTS = {"l4-1-2": BlockSparseLayout(4, 1, 2), "l8-2-3": BlockSparseLayout(8, 2, 3),
           "l4-3-4": BlockSparseLayout(4, 3, 4), "l2-2-3": BlockSparseLayout(2, 2, 3)}  # the last: 2 layout blocks a page
VARIANTS = {  # name -> spec (block-sparse ones with GQA 8 / 2)
    "sinks": _spec(sinks=True), "window-sinks": _spec(window=7, sinks=True), "window": _spec(window=6),
    "window-softcap": _spec(window=9, softcap=20.0), "window-softcap-sinks": _spec(window=9, softcap=20.0, sinks=True),
    **{name: _spec(layout=layout, heads=8) for name, layout in LAYOUTS.items()},
    **{f"{name}-sinks": _spec(layout=layout, heads=8, sinks=True) for name, layout in LAYOUTS.items()},
    "l8-2-3-softcap": _spec(layout=LAYOUTS["l8-2-3"], heads=8, softcap=20.0),
    "l4-1-2-softcap-sinks-window": _spec(layout=LAYOUTS["l4-1-2"], heads=8, softcap=20.0, sinks=True, window=11),
}


def _check_variant(spec, seq_lens, q_lens, attention):
    """`attention` (a cpu_ops call on tables that hide the unseen pages, see _hide_unseen_pages)
    equals the reference on the real tables."""
    q, k_cache, v_cache, query_start, seq_lens, tables = _paged(seq_lens, q_lens, heads=spec.num_heads)
    sinks = torch.randn(spec.num_heads, generator=torch.Generator().manual_seed(5)) * 2 if spec.sinks else None
    want = reference.paged_attention(q, k_cache, v_cache, query_start, seq_lens, tables, spec, sinks)
    *hidden_caches, hidden_tables, hidden = _hide_unseen_pages(k_cache, v_cache, query_start, seq_lens, tables, spec)
    assert hidden > 0 or spec.kind is AttentionKind.DENSE
    got = attention(q, *hidden_caches, query_start, seq_lens, hidden_tables, **_options(spec, sinks))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_attention_with_sinks_windows_and_layouts_matches_reference(name):
    # two decodes, chunks that start mid-sequence (one ends mid-page), a whole prompt, odd lengths
    _check_variant(VARIANTS[name], [37, 5, 50, 29, 23], [1, 1, 13, 29, 7], cpu_ops.prefill_attention)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_attention_with_sinks_windows_and_layouts_matches_reference(name):
    lengths = [37, 1, 50, 29, 3, 61, 17, 44, 9, 33, 26]  # two groups of different lengths
    _check_variant(VARIANTS[name], lengths, [1] * len(lengths),
                   lambda q, k, v, starts, lens, tables, **o: cpu_ops.decode_attention(q, k, v, lens, tables, **o))


LONG_VARIANTS = {"dense": _spec(), "softcap": _spec(softcap=20.0), "dense-sinks": _spec(sinks=True),
                 "softcap-sinks-gqa8": _spec(softcap=20.0, sinks=True, heads=8), **VARIANTS}


@pytest.fixture
def small_blocks(monkeypatch):
    """Key blocks of a page or two and softcap tiles of a few queries (`_BLOCK_BYTES`), so that
    the contexts below span many blocks."""
    monkeypatch.setattr(cpu_ops, "_BLOCK_BYTES", 2048)
    monkeypatch.setattr(cpu_ops, "_SOFTCAP_KEYS", 8)


@pytest.mark.parametrize("name", list(LONG_VARIANTS))
def test_prefill_attention_in_key_blocks_matches_reference(name, small_blocks):
    # two decodes; chunks starting mid-sequence (one mid-page) after long cached prefixes; a whole prompt
    _check_variant(LONG_VARIANTS[name], [37, 5, 150, 93, 71], [1, 1, 40, 93, 9], cpu_ops.prefill_attention)


@pytest.mark.parametrize("name", list(LONG_VARIANTS))
def test_decode_attention_in_key_blocks_matches_reference(name, small_blocks):
    lengths = [137, 1, 50, 129, 3, 61, 17, 44, 9, 33, 26]
    _check_variant(LONG_VARIANTS[name], lengths, [1] * len(lengths),
                   lambda q, k, v, starts, lens, tables, **o: cpu_ops.decode_attention(q, k, v, lens, tables, **o))


@pytest.mark.parametrize("name", ["dense", "softcap", "window", "l4-1-2"])
def test_prefill_blocks_do_not_grow_with_the_context(name, small_blocks, monkeypatch):
    """A 12-query chunk attends in blocks of the same size after a 60- or a 600-token context."""
    calls = []
    attend = cpu_ops._attend
    monkeypatch.setattr(cpu_ops, "_attend", lambda q, k, *a, **o: calls.append(q.shape[2] * k.shape[2]) or attend(q, k, *a, **o))
    spec = LONG_VARIANTS[name]
    largest = {}
    for length in (60, 600):
        calls.clear()
        _check_variant(spec, [length], [12], cpu_ops.prefill_attention)
        largest[length] = max(calls)  # queries x keys of the largest block
    assert largest[600] == largest[60]
    assert len(calls) > 1 or spec.window is not None


@pytest.mark.parametrize("rows", [1, 5])
def test_linear_t_matches_matmul(rows):
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(rows, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    want = (x.double() @ weight.double().t() + bias.double()).float()
    torch.testing.assert_close(cpu_ops.linear_t(x, weight.t().contiguous(), bias), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_ops.linear_t(x, weight.t().contiguous()), want - bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotary_dim, dtype", [(None, torch.float32), (8, torch.float32), (None, torch.bfloat16)])
def test_rope_with_a_step_table_matches_reference(rotary_dim, dtype):
    spec = RopeSpec(head_dim=D, theta=10000.0, rotary_dim=rotary_dim)
    x = torch.randn(7, H, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    positions = torch.tensor([0, 1, 2, 40, 41, 5, 900])
    got = cpu_ops.rope(x, cpu_ops.rope_table(positions, spec.inv_freq(), dtype))
    torch.testing.assert_close(got, reference.rope(x, positions, spec), rtol=0, atol=0)


def test_rms_norm_matches_reference():
    x, weight = torch.randn(5, 32, generator=torch.Generator().manual_seed(0)) * 3, torch.randn(32)
    for w in (None, weight):
        torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), rtol=1e-6, atol=1e-6)


def test_steps_run_on_the_cores_other_processes_leave_free():
    assert step_threads(2, others=0.3) == 2
    assert step_threads(2, others=-0.5) == 2  # the load average lags our own use
    assert step_threads(2, others=0.8) == 1
    assert step_threads(2, others=3.0) == 1
    assert step_threads(16, others=3.0) == 13


def test_other_load_averages_the_runnable_threads_that_are_not_ours(monkeypatch):
    monkeypatch.setattr(executor, "_runnable_now", lambda: 3.0)
    load = OtherLoad(ours=2)
    assert load.others == 1.0
    load.others = 0.0
    for _ in range(20):
        load.update(ours=2)  # after each step: our 2 threads and 1 other
    assert load.others == pytest.approx(1.0, abs=0.01)
    monkeypatch.setattr(executor, "_runnable_now", lambda: 1.0)
    load.update(ours=1)
    assert load.others == pytest.approx(0.5, abs=0.01)  # one quiet step halves it


@pytest.mark.parametrize("slot_mapping", [[5, 0, 17], [5, -1, 17]])
def test_write_cache_matches_reference(slot_mapping):
    x, cache = torch.randn(3, HKV, D), torch.randn(6, BS, HKV, D)
    slots = torch.tensor(slot_mapping, dtype=torch.int32)
    want = reference.write_rows(x, cache.clone(), slots)
    cpu_ops.write_cache(x, cache, cpu_ops.cache_slots(slots))
    torch.testing.assert_close(cache, want, rtol=0, atol=0)


def test_heap_goes_back_to_the_os_only_after_a_step_that_left_too_much_of_it(monkeypatch):
    resident = iter([1000, 1100, 1300, 1050, 1200, 1400, 1400, 1500, 1650, 1651, 1400])  # read in this order
    monkeypatch.setattr(executor, "resident_bytes", lambda: next(resident))
    heap = HeapTrim(retain=250)
    trims = []
    heap.malloc_trim = trims.append
    assert heap.floor == 1000
    assert [heap.after_step(), heap.after_step()] == [False, True]  # 100, then 300 over the floor: trimmed
    assert trims == [0] and heap.floor == 1050  # the new floor: what the trim left
    assert [heap.after_step(), heap.after_step()] == [False, True]  # 150, then 350 over
    assert heap.floor == 1400  # that trim freed nothing (the memory is in use): no trim again before 250 more
    assert [heap.after_step(), heap.after_step(), heap.after_step()] == [False, False, True]
    assert trims == [0, 0, 0] and heap.floor == 1400
