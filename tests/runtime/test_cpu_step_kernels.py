"""The cpu target's step-op C kernels (codegen/cpu_step_kernels.py, runtime/cpu_step_kernels.py)
against runtime/cpu_ops.py's torch code: each cpu_ops function with the kernels installed vs the
same call without them, on random inputs of odd sizes, for the best ISA variant this CPU runs
and x86-64-v2 (4 lanes, no AVX).

Tolerances: rope, silu's product and the cache writes are exact (the kernels round as torch does,
or copy); rms_norm and attention sum in their own order (fp32 rounding: ~1e-7 relative), and the
kernels' exp and tanh are within a few ulp; a wrong element, key, mask or head is off by far more.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from kiln.codegen.cpu_kernels import isa_variants
from kiln.codegen.cpu_step_kernels import build_step_library
from kiln.errors import KilnError
from kiln.runtime import cpu_ops, cpu_quant, cpu_step_kernels

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

CLOSE = dict(rtol=1e-5, atol=1e-5)


def _variants() -> list[str]:
    best = next(v for v in cpu_quant.preferred_variants() if v in isa_variants())
    return [best] + (["x86-64-v2"] if "x86-64-v2" in isa_variants() and best != "x86-64-v2" else [])


@pytest.fixture(scope="session")
def libraries(tmp_path_factory) -> dict[str, cpu_step_kernels.StepKernels]:
    """{variant: kernels}, built once per session."""
    out = tmp_path_factory.mktemp("step_kernels")
    files = build_step_library(out, variants=_variants())
    return {variant: cpu_step_kernels.load_step_library(out, {variant: name}) for variant, name in files.items()}


@pytest.fixture(params=_variants())
def kernels(request, libraries) -> cpu_step_kernels.StepKernels:
    return libraries[request.param]


def both(kernels, fn, *args, **kwargs):
    """fn(*args, **kwargs) on torch, then with `kernels` installed (each on clones of tensor
    arguments, which the call may write): (torch's result, the kernels', torch's args, the kernels' args)."""
    results = []
    for installed in (None, kernels):
        cloned = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        cpu_step_kernels.install(installed)
        try:
            results.append((fn(*cloned, **kwargs), cloned))
        finally:
            cpu_step_kernels.install(None)
    (ref, ref_args), (got, got_args) = results
    return ref, got, ref_args, got_args


def test_library_builds_are_cached(tmp_path, monkeypatch, libraries):
    commands, popen = [], subprocess.Popen

    def recording_popen(cmd, *args, **kwargs):
        commands.append(cmd)
        return popen(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    assert build_step_library(tmp_path, variants=_variants()) == {v: f"step_ops.{v}.so" for v in _variants()}
    assert not [cmd for cmd in commands if "-shared" in cmd]  # only `gcc --version`


@pytest.mark.parametrize("shape", [(1, 576), (3, 37), (2, 5, 20), (128, 576)])  # the last: split over threads
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm(kernels, shape, weighted):
    x = torch.randn(shape) * 3
    weight = torch.randn(shape[-1]) if weighted else None
    ref, got, *_ = both(kernels, cpu_ops.rms_norm, x, weight, 1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 3072), (3, 74), (40, 1040)])
def test_silu_mul(kernels, shape):
    x = torch.randn(shape) * 4
    x[0, :6] = torch.tensor([-100.0, 100.0, -1e4, 1e4, 0.0, -0.0])
    ref, got, *_ = both(kernels, cpu_ops.silu_mul, x)
    assert got.shape == (shape[0], shape[1] // 2)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def _rope_inputs(tokens: int, heads: int, dim: int, freqs: int, factor: float = 1.0, kv_heads: int = 2):
    """q [T, heads, dim], k, v [T, kv_heads, dim]: views of one fused projection [T, (heads + 2 kv_heads) dim],
    as the step programs narrow it, and a rope_table of `freqs` frequencies."""
    fused = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    q, k, v = (fused.narrow(1, a * dim, n * dim).reshape(tokens, n, dim)
               for a, n in ((0, heads), (heads, kv_heads), (heads + kv_heads, kv_heads)))
    table = cpu_ops.rope_table(torch.randint(0, 5000, (tokens,)), 1e-4 ** (torch.arange(freqs) / freqs), torch.float32,
                               factor)
    return q, k, v, table


@pytest.mark.parametrize("tokens, heads, dim, freqs, factor", [(1, 9, 64, 32, 1.0), (5, 3, 64, 32, 1.0),
                                                              (4, 5, 24, 9, 1.3), (3, 2, 20, 10, 1.0),
                                                              (120, 9, 64, 32, 1.0)])  # split over threads
def test_rope(kernels, tokens, heads, dim, freqs, factor):
    q, _, _, table = _rope_inputs(tokens, heads, dim, freqs, factor)
    ref, got, *_ = both(kernels, cpu_ops.rope, q, table)
    assert torch.equal(got, ref)


def _caches(num_blocks: int = 90, block_size: int = 4, kv_heads: int = 2, dim: int = 24):
    return torch.randn(num_blocks, block_size, kv_heads, dim), torch.randn(num_blocks, block_size, kv_heads, dim)


@pytest.mark.parametrize("tokens", [1, 5, 320])  # 320: split over threads
def test_write_cache_and_rope_write(kernels, tokens):
    q, k, v, table = _rope_inputs(tokens, 5, 24, 9)
    k_cache, v_cache = _caches()
    slots = cpu_ops.cache_slots(torch.randperm(360)[:tokens].to(torch.int32))
    ref, got, ref_args, got_args = both(kernels, cpu_ops.write_cache, k, k_cache, slots)
    assert torch.equal(got_args[1], ref_args[1])
    ref, got, ref_args, got_args = both(kernels, cpu_ops.rope_write, q, k, v, table, k_cache, v_cache, slots)
    assert torch.equal(got, ref)
    assert torch.equal(got_args[4], ref_args[4]) and torch.equal(got_args[5], ref_args[5])
    fused = q.as_strided((tokens, 9 * 24), (q.stride(0), 1))  # the projection q, k, v are views of
    ref_qkv, got_qkv, ref_args, got_args = both(kernels, cpu_ops.rope_write_qkv, fused, 5, 2, 24, table, k_cache,
                                                v_cache, slots)
    assert torch.equal(got_qkv, ref) and torch.equal(ref_qkv, ref)
    assert torch.equal(got_args[5], ref_args[5]) and torch.equal(got_args[6], ref_args[6])


def test_rope_write_one_kv_head(kernels):
    q, k, v, table = _rope_inputs(3, 4, 16, 8, kv_heads=1)
    k, v = k.as_strided(k.shape, (k.stride(0), 999, 1)), v.as_strided(v.shape, (v.stride(0), 999, 1))  # any head stride
    k_cache, v_cache = torch.randn(5, 4, 1, 16), torch.randn(5, 4, 1, 16)
    slots = cpu_ops.cache_slots(torch.tensor([7, 0, 19], dtype=torch.int32))
    assert kernels.rope_write(q, k, v, *table, k_cache.clone(), v_cache.clone(), slots[1]) is not None  # the C path
    ref, got, ref_args, got_args = both(kernels, cpu_ops.rope_write, q, k, v, table, k_cache, v_cache, slots)
    assert torch.equal(got, ref) and torch.equal(got_args[4], ref_args[4]) and torch.equal(got_args[5], ref_args[5])


def test_writes_skip_slot_minus_one_and_check_bounds(kernels):
    q, k, v, table = _rope_inputs(3, 5, 24, 9)
    k_cache, v_cache = _caches()
    skipping = cpu_ops.cache_slots(torch.tensor([3, -1, 9], dtype=torch.int32))  # torch's path (the kernels take all)
    ref, got, ref_args, got_args = both(kernels, cpu_ops.rope_write, q, k, v, table, k_cache, v_cache, skipping)
    assert torch.equal(got, ref) and torch.equal(got_args[4], ref_args[4]) and torch.equal(got_args[5], ref_args[5])
    outside = cpu_ops.cache_slots(torch.tensor([3, 360, 9], dtype=torch.int32))  # 90 blocks of 4: slots 0..359
    cpu_step_kernels.install(kernels)
    try:
        with pytest.raises(KilnError, match="outside"):
            cpu_ops.write_cache(k, k_cache, outside)
        with pytest.raises(KilnError, match="outside"):
            cpu_ops.rope_write(q, k, v, table, k_cache, v_cache, outside)
    finally:
        cpu_step_kernels.install(None)


def _paged(seq_lens: list[int], heads: int, kv_heads: int, dim: int, block_size: int = 4, seed: int = 0):
    """q [B, heads, dim] and caches [NB, block_size, kv_heads, dim] holding each sequence's context
    in shuffled blocks; seq_lens and block tables (int32, padded with block 0)."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in seq_lens]
    ids = torch.randperm(sum(blocks) + 3, generator=g).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    for b, n in enumerate(blocks):
        tables[b, :n] = torch.tensor(ids[:n])
        ids = ids[n:]
    k_cache, v_cache = (torch.randn(sum(blocks) + 3, block_size, kv_heads, dim, generator=g) for _ in range(2))
    q = torch.randn(len(seq_lens), heads, dim, generator=g)
    return q, k_cache, v_cache, torch.tensor(seq_lens, dtype=torch.int32), tables


VARIANTS = [dict(), dict(window=5), dict(softcap=30.0), dict(softcap=2.0), dict(layout=(8, 2, 3)),
            dict(sinks=torch.randn(6)), dict(window=11, softcap=5.0, sinks=torch.randn(6)),
            dict(window=40, layout=(4, 3, 4))]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(o) or "dense")
def test_decode_attention(kernels, options):
    # GQA (3 query heads per kv head), a 1-token context, one that fills whole tiles of 32 keys, one that
    # doesn't, one attended in two pieces (of 256 positions)
    q, k_cache, v_cache, seq_lens, tables = _paged([9, 1, 3, 64, 77, 300], heads=6, kv_heads=2, dim=20)
    if "window" in options or "layout" in options:  # pages no query sees may point anywhere
        tables[3, 0] = tables[4, 1] = 10**6
    ref, got, *_ = both(kernels, cpu_ops.decode_attention, q, k_cache, v_cache, seq_lens, tables, scale=20**-0.5,
                        **options)
    torch.testing.assert_close(got, ref, **CLOSE)


@pytest.mark.parametrize("heads, kv_heads, dim", [(3, 3, 64), (34, 2, 130)])  # no GQA; 17 heads a kv head, odd D
def test_decode_attention_head_shapes(kernels, heads, kv_heads, dim):
    q, k_cache, v_cache, seq_lens, tables = _paged([5, 40], heads=heads, kv_heads=kv_heads, dim=dim)
    ref, got, *_ = both(kernels, cpu_ops.decode_attention, q, k_cache, v_cache, seq_lens, tables, scale=dim**-0.5,
                        sinks=torch.randn(heads))
    torch.testing.assert_close(got, ref, **CLOSE)


def test_decode_attention_on_threads_and_in_mixed_steps(kernels):
    # enough work to split the (sequence, kv head) pairs over threads: the same bits on one thread
    q, k_cache, v_cache, seq_lens, tables = _paged([700, 650, 20, 690], heads=8, kv_heads=2, dim=64, block_size=16)
    ref, got, *_ = both(kernels, cpu_ops.decode_attention, q, k_cache, v_cache, seq_lens, tables, scale=0.125)
    torch.testing.assert_close(got, ref, **CLOSE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, one_thread, *_ = both(kernels, cpu_ops.decode_attention, q, k_cache, v_cache, seq_lens, tables, scale=0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, got)
    # prefill_attention's leading decodes take the kernel too
    q, k_cache, v_cache, seq_lens, tables = _paged([9, 30, 13], heads=6, kv_heads=2, dim=16)
    q = torch.randn(1 + 1 + 5, 6, 16)
    query_start = torch.tensor([0, 1, 2, 7], dtype=torch.int32)
    ref, got, *_ = both(kernels, cpu_ops.prefill_attention, q, k_cache, v_cache, query_start, seq_lens, tables,
                        scale=0.25, softcap=20.0)
    torch.testing.assert_close(got, ref, **CLOSE)


def test_decode_attention_checks_lengths_and_pages(kernels):
    q, k_cache, v_cache, seq_lens, tables = _paged([9, 5], heads=4, kv_heads=2, dim=8)
    cpu_step_kernels.install(kernels)
    try:
        for lens, table in [([13, 5], tables), ([9, 5], tables.index_fill(1, torch.tensor([1]), 99))]:
            with pytest.raises(KilnError, match="outside the KV cache"):
                cpu_ops.decode_attention(q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32), table, scale=0.3)
    finally:
        cpu_step_kernels.install(None)


def test_unsupported_cases_run_on_torch(kernels):
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    ref, got, *_ = both(kernels, cpu_ops.rms_norm, x, torch.randn(40, dtype=torch.bfloat16), 1e-6)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)
    ref, got, *_ = both(kernels, cpu_ops.silu_mul, torch.randn(2, 4, 20))  # the kernel takes [M, 2I]
    assert torch.equal(got, ref)
    q, k_cache, v_cache, seq_lens, tables = _paged([9, 5], heads=4, kv_heads=2, dim=8)
    ref, got, *_ = both(kernels, cpu_ops.decode_attention, q, k_cache, v_cache, seq_lens.long(), tables, scale=0.3)
    assert torch.equal(got, ref)  # int64 lengths: torch's path


def test_add_gather_rows_and_slots(kernels):
    """Exact: an fp32 sum, a copy, a widening."""
    a, b = torch.randn(3, 70), torch.randn(3, 70)
    ref, got, *_ = both(kernels, cpu_ops.add, a, b)
    assert torch.equal(got, ref)
    ref, got, *_ = both(kernels, cpu_ops.add, a, torch.randn(70))  # broadcasting: torch's path
    assert torch.equal(got, ref)
    rows = torch.tensor([2, 0, 2], dtype=torch.int32)
    ref, got, *_ = both(kernels, cpu_ops.gather_rows, a, rows)
    assert torch.equal(got, ref)
    table_t = torch.randn(70, 3)  # a tied embedding table as the cpu target stores it: gathered by columns
    ref, got, *_ = both(kernels, cpu_ops.embedding_t, rows, table_t)
    assert torch.equal(got, ref) and torch.equal(got, table_t.t()[rows.long()])
    slots = torch.tensor([5, 0, 17], dtype=torch.int32)
    ref, got, *_ = both(kernels, cpu_ops.cache_slots, slots)
    assert ref[0] is None and got[0] is None and torch.equal(got[1], ref[1]) and got[1].dtype == torch.int64
    skipping = torch.tensor([5, -1, 17], dtype=torch.int32)  # slot -1: the kernel declines, torch keeps a mask
    ref, got, *_ = both(kernels, cpu_ops.cache_slots, skipping)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    cpu_step_kernels.install(kernels)
    try:
        with pytest.raises(KilnError, match="outside the 3 rows"):
            cpu_ops.gather_rows(a, torch.tensor([3], dtype=torch.int32))
    finally:
        cpu_step_kernels.install(None)


@pytest.mark.parametrize("rows, k, n", [(1, 576, 960), (1, 37, 61), (3, 40, 100), (8, 64, 48), (16, 24, 7), (1, 7, 30),
                                        (2, 7, 30)])
@pytest.mark.parametrize("biased", [False, True])
def test_linear(kernels, rows, k, n, biased):
    """A fp32 linear of few rows (odd K and N: the tails of the vectors and tiles; K < 16: one slice
    of K empty) against fp64; each row bit-equal to itself computed alone and on one thread."""
    g = torch.Generator().manual_seed(rows * k + n)
    x, weight_t = torch.randn(rows, k, generator=g), torch.randn(k, n, generator=g)
    bias = torch.randn(n, generator=g) if biased else None
    ref, got, *_ = both(kernels, cpu_ops.linear_t, x, weight_t, bias)
    want = x.double() @ weight_t.double() + (0 if bias is None else bias.double())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref, want.float(), rtol=1e-5, atol=1e-4)
    threads = torch.get_num_threads()
    cpu_step_kernels.install(kernels)
    try:
        alone = torch.cat([cpu_ops.linear_t(x[i:i + 1], weight_t, bias) for i in range(rows)])
        torch.set_num_threads(1)
        one_thread = cpu_ops.linear_t(x, weight_t, bias)
    finally:
        torch.set_num_threads(threads)
        cpu_step_kernels.install(None)
    assert torch.equal(alone, got) and torch.equal(one_thread, got)


def test_linear_runs_large_batches_and_other_dtypes_on_torch(kernels):
    x, weight_t = torch.randn(cpu_step_kernels.LINEAR_ROWS, 16), torch.randn(16, 24)
    ref, got, *_ = both(kernels, cpu_ops.linear_t, x, weight_t)
    assert torch.equal(got, ref)
    ref, got, *_ = both(kernels, cpu_ops.linear_t, x[:2].bfloat16(), weight_t.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


@pytest.mark.parametrize("factor", [1.0, 0.7])
def test_rope_table(kernels, factor):
    """int32 positions on the kernel (libm's cosf / sinf: within an ulp or so of torch's), others on torch."""
    positions = torch.randint(0, 100_000, (37,), dtype=torch.int32)
    inv_freq = 1e-4 ** (torch.arange(32) / 32)
    (ref_cos, ref_sin), (cos, sin), *_ = both(kernels, cpu_ops.rope_table, positions, inv_freq, torch.float32, factor)
    assert cos.shape == ref_cos.shape == (37, 1, 32)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)
    ref, got, *_ = both(kernels, cpu_ops.rope_table, positions.long(), inv_freq, torch.float32, factor)
    assert torch.equal(got[0], ref[0])  # int64 positions: torch's path
