"""Block-sparse paged attention (prefill, decode, split-K decode) vs the IR's reference.

Each case runs on shuffled physical blocks; after the references are computed, every KV page of a
layout block that no query of its sequence sees is filled with NaN, and every other such block-table
entry is pointed at a shared NaN page (as if the cache manager had reused it): a kernel that read
any of them would return NaN. The tile-count tests count the KV tiles the interpreted kernels visit
against the tiles an independent count from `BlockSparseLayout.sees` asks for.
"""

import math

import pytest
import torch

from kiln.codegen.kernels import attention_decode, attention_prefill
from kiln.codegen.kernels.attention import AttentionParams
from kiln.codegen.kernels.attention_reference import make_paged_step, paged_attention_reference
from kiln.errors import KilnError
from kiln.ir.specs import AttentionKind, AttentionSpec, BlockSparseLayout, KVLayout

# Triton 3.6's interpreter gives program ids shape [1] (see test_attention.py).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

GQA = dict(num_heads=8, num_kv_heads=2, head_dim=32)
# name -> (attention params but dtype, q_lens, seq_lens): decodes, a whole prompt, chunks starting
# mid-sequence; layout blocks of 1x to 4x the page size (24: not a power of two), local 1..3, stride 2..4.
PREFILL_CASES = {
    "block1x_local1_stride2": (dict(**GQA, page_size=4, block_sparse=(4, 1, 2)), [1, 13, 7, 1], [67, 13, 45, 30]),
    "block2x_local2_stride3_sinks": (dict(**GQA, page_size=4, block_sparse=(8, 2, 3), sinks=True),
                                     [9, 1, 14], [61, 39, 14]),
    "block4x_local3_stride4_softcap": (dict(**GQA, page_size=8, block_sparse=(32, 3, 4), softcap=5.0),
                                       [1, 21], [150, 109]),
    "block3x_local1_stride3_sinks": (dict(**GQA, page_size=8, block_sparse=(24, 1, 3), sinks=True),
                                     [5, 1], [101, 77]),
    # one head per kv head: a query tile of 16 tokens spans several 4-token layout blocks
    "mha_block1x_local2_stride2": (dict(num_heads=2, num_kv_heads=2, head_dim=16, page_size=4, block_sparse=(4, 2, 2)),
                                   [19, 1], [53, 26]),
}
DECODE_CASES = {
    "block1x_local1_stride2": (dict(**GQA, page_size=4, block_sparse=(4, 1, 2)), [47, 1, 30, 9]),
    "block2x_local2_stride3_sinks": (dict(**GQA, page_size=4, block_sparse=(8, 2, 3), sinks=True), [61, 39, 8]),
    "block4x_local3_stride4_softcap": (dict(**GQA, page_size=8, block_sparse=(32, 3, 4), softcap=5.0), [150, 97]),
    "block3x_local1_stride3_sinks": (dict(**GQA, page_size=8, block_sparse=(24, 1, 3), sinks=True), [101, 49, 24]),
}


def sparse_step(attn: AttentionParams, q_lens, seq_lens, seed):
    """(q, k_cache, v_cache, step, sinks) on the CPU, as test_attention.paged_inputs builds them
    (shuffled blocks, garbage block-table tails, 3 spare blocks)."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(n / attn.page_size) for n in seq_lens) + 3
    step = make_paged_step(q_lens, seq_lens, attn.page_size, num_blocks, generator)
    cache_shape = (num_blocks, attn.page_size, attn.num_kv_heads, attn.head_dim)
    q, k_cache, v_cache = (torch.randn(shape, generator=generator).to(attn.torch_dtype)
                           for shape in ((sum(q_lens), attn.num_heads, attn.head_dim), cache_shape, cache_shape))
    sinks = (2 * torch.randn(attn.num_heads, generator=generator)).to(attn.torch_dtype) if attn.sinks else None
    return q, k_cache, v_cache, step, sinks


def references(attn: AttentionParams, q, k_cache, v_cache, step, sinks):
    """(exact fp64 oracle, same-dtype baseline): the IR reference with the layer's layout."""
    args = (q, k_cache, v_cache, step.query_start, step.seq_lens, step.block_tables)
    options = dict(scale=attn.scale, softcap=attn.softcap, sinks=sinks, block_sparse=attn.layout)
    return paged_attention_reference(*args, **options, exact=True), paged_attention_reference(*args, **options)


def poison_hidden_blocks(attn: AttentionParams, k_cache, v_cache, step) -> int:
    """NaN-fills the pages of every layout block that no query of its sequence sees, and points
    every other such block-table entry at a spare page, also NaN (in place). Returns the number
    of hidden pages (the test is vacuous without any)."""
    layout, page = attn.layout, attn.page_size
    spare = sorted(set(range(k_cache.shape[0])) - set(step.block_tables[step.block_tables >= 0].tolist()))[0]
    k_cache[spare] = v_cache[spare] = float("nan")
    hidden = 0
    for seq, seq_len in enumerate(step.seq_lens.tolist()):
        q_len = int(step.query_start[seq + 1] - step.query_start[seq])
        query_blocks = torch.arange(seq_len - q_len, seq_len) // layout.block_size
        for i_page in range(math.ceil(seq_len / page)):
            if layout.sees(query_blocks, i_page * page // layout.block_size).any():
                continue
            block = int(step.block_tables[seq, i_page])
            k_cache[block] = v_cache[block] = float("nan")
            if hidden % 2:
                step.block_tables[seq, i_page] = spare
            hidden += 1
    return hidden


# every case in bf16; two of each also in fp32, whose tolerance is far tighter
PREFILL_RUNS = [(case, "bf16") for case in PREFILL_CASES] + [(case, "fp32") for case in list(PREFILL_CASES)[:2]]
DECODE_RUNS = [(case, "bf16") for case in DECODE_CASES] + [(case, "fp32") for case in list(DECODE_CASES)[1:3]]


@pytest.mark.parametrize("case, dtype", PREFILL_RUNS)
def test_prefill_matches_reference_and_never_reads_hidden_blocks(device, target, check_close, dtype, case):
    params, q_lens, seq_lens = PREFILL_CASES[case]
    attn = AttentionParams(dtype, **params)
    q, k_cache, v_cache, step, sinks = sparse_step(attn, q_lens, seq_lens, seed=len(case))
    exact, same_dtype = references(attn, q, k_cache, v_cache, step, sinks)
    assert poison_hidden_blocks(attn, k_cache, v_cache, step) > 0
    args = (q, k_cache, v_cache, step.query_start, step.seq_lens, step.block_tables)
    out = attention_prefill.launch(attention_prefill.choose(target, attn), *(t.to(device) for t in args),
                                   None if sinks is None else sinks.to(device))
    check_close(out.cpu(), exact, same_dtype)


@pytest.mark.parametrize("case, dtype", DECODE_RUNS)
def test_decode_with_and_without_split_k_matches_reference_and_never_reads_hidden_blocks(device, target, check_close,
                                                                                        dtype, case):
    params, seq_lens = DECODE_CASES[case]
    attn = AttentionParams(dtype, **params)
    q, k_cache, v_cache, step, sinks = sparse_step(attn, [1] * len(seq_lens), seq_lens, seed=len(case))
    exact, same_dtype = references(attn, q, k_cache, v_cache, step, sinks)
    assert poison_hidden_blocks(attn, k_cache, v_cache, step) > 0
    q, k_cache, v_cache, seq_lens, block_tables = (t.to(device) for t in (q, k_cache, v_cache, step.seq_lens,
                                                                           step.block_tables))
    sinks = None if sinks is None else sinks.to(device)
    # 5 splits: uneven shares of the visible tiles, and more splits than a short sequence has tiles
    for split_k, num_splits in ((False, 1), (True, 5)):
        out = attention_decode.launch(attention_decode.choose(target, attn, split_k=split_k), q, k_cache, v_cache,
                                      seq_lens, block_tables, sinks=sinks, num_splits=num_splits)
        check_close(out.cpu(), exact, same_dtype)


# -- the kernels visit only the tiles the layout asks for ----------------------------------------

def visible_tiles(layout: BlockSparseLayout, first_query: int, last_query: int, block_n: int) -> int:
    """BLOCK_N-aligned key tiles holding a key that one of the queries first_query..last_query
    sees (valid when block_n divides the layout's block size, as the tests below pick)."""
    keys = torch.arange(last_query + 1)
    seen = torch.zeros(len(keys), dtype=torch.bool)
    for query in range(first_query, last_query + 1):
        seen |= (keys <= query) & layout.sees(query // layout.block_size, keys // layout.block_size)
    return len(set((keys[seen] // block_n).tolist()))


def count_tile_visits(monkeypatch, module) -> list[int]:
    """A one-element list counting the generated kernel `module`'s calls of kv_tile_offsets (once per KV tile)."""
    calls = [0]
    original = module.kv_tile_offsets

    def counted(*args):
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(module, "kv_tile_offsets", counted)
    return calls


interpreted_only = pytest.mark.skipif(torch.cuda.is_available(), reason="counts calls in Triton's interpreter")
SPARSE = BlockSparseLayout(block_size=16, local_blocks=2, vertical_stride=8)


@interpreted_only
def test_decode_visits_only_the_visible_tiles(monkeypatch, target):
    attn = AttentionParams("fp32", num_heads=4, num_kv_heads=1, head_dim=16, page_size=8,
                           block_sparse=(SPARSE.block_size, SPARSE.local_blocks, SPARSE.vertical_stride))
    seq_lens = [1000, 77]
    q, k_cache, v_cache, step, _ = sparse_step(attn, [1, 1], seq_lens, seed=5)
    for split_k, num_splits in ((False, 1), (True, 3)):
        variant = attention_decode.choose(target, attn, split_k=split_k)
        assert SPARSE.block_size % variant.block_n == 0
        calls = count_tile_visits(monkeypatch, attention_decode.load(variant))
        attention_decode.launch(variant, q, k_cache, v_cache, step.seq_lens, step.block_tables, num_splits=num_splits)
        expected = sum(visible_tiles(SPARSE, n - 1, n - 1, variant.block_n) for n in seq_lens)
        dense = sum(math.ceil(n / variant.block_n) for n in seq_lens)
        assert calls[0] == expected, (split_k, calls[0], expected)
        assert 6 * expected < dense, (expected, dense)


@interpreted_only
def test_prefill_visits_only_the_tiles_its_query_tiles_see(monkeypatch, target):
    attn = AttentionParams("fp32", num_heads=4, num_kv_heads=1, head_dim=16, page_size=8,
                           block_sparse=(SPARSE.block_size, SPARSE.local_blocks, SPARSE.vertical_stride))
    q_lens, seq_lens = [1, 40, 1], [900, 530, 200]
    q, k_cache, v_cache, step, _ = sparse_step(attn, q_lens, seq_lens, seed=6)
    variant = attention_prefill.choose(target, attn)
    calls = count_tile_visits(monkeypatch, attention_prefill.load(variant))
    attention_prefill.launch(variant, q, k_cache, v_cache, step.query_start, step.seq_lens, step.block_tables)
    expected = dense = 0
    for q_len, seq_len in zip(q_lens, seq_lens):
        for tile_start in range(seq_len - q_len, seq_len, variant.block_q):
            last = min(tile_start + variant.block_q, seq_len) - 1
            expected += visible_tiles(SPARSE, tile_start, last, variant.block_n)
            dense += math.ceil((last + 1) / variant.block_n)
    assert calls[0] == expected
    assert 4 * expected < dense, (expected, dense)


# -- the layer in kernel terms ---------------------------------------------------------------------

def test_params_from_a_block_sparse_spec_name_the_layout_in_the_cache_key():
    layout = BlockSparseLayout(block_size=64, local_blocks=4, vertical_stride=8)
    spec = AttentionSpec(AttentionKind.BLOCK_SPARSE, num_heads=8, num_kv_heads=2, head_dim=64, sinks=True,
                         block_sparse=layout, kv_layout=KVLayout(block_size=16))
    attn = AttentionParams.from_spec(spec, "bf16")
    assert attn.layout == layout and attn.window is None
    assert attn.key == "bf16__h8_kv2_d64__p16__sparse64_local4_stride8__sinks"
    assert attention_decode.Variant(attn, True, 64, 4, 3).cache_key.startswith(
        "attention_decode__bf16__h8_kv2_d64__p16__sparse64_local4_stride8__sinks__splitk")


def test_layouts_the_kernels_cannot_run_are_user_errors():
    with pytest.raises(KilnError, match="multiple of the KV page size 16"):
        AttentionParams("fp32", 8, 2, 64, 16, block_sparse=(24, 1, 2))
    with pytest.raises(KilnError, match="no sliding window"):
        AttentionParams("fp32", 8, 2, 64, 16, window=128, block_sparse=(32, 1, 2))


@pytest.mark.parametrize("layout", [BlockSparseLayout(16, 2, 8), BlockSparseLayout(24, 1, 3), BlockSparseLayout(8, 3, 1)])
def test_visible_keys_counts_what_the_last_query_sees(layout):
    attn = AttentionParams("fp32", 4, 1, 16, 8, block_sparse=(layout.block_size, layout.local_blocks,
                                                               layout.vertical_stride))
    for context in (0, 1, 7, 8, 23, 24, 25, 200, 1001):
        keys = torch.arange(context)
        seen = layout.sees((context - 1) // layout.block_size, keys // layout.block_size)
        assert attn.visible_keys(context) == int(seen.sum()), context


@pytest.mark.parametrize("block_size, block_n", [(16, 16), (64, 64), (128, 64), (48, 16), (24, 16), (8, 16)])
def test_tiles_shrink_to_divide_the_layout_block(block_size, block_n):
    attn = AttentionParams("fp32", 4, 1, 64, 8, block_sparse=(block_size, 1, 2))
    assert attn.fit_block_n(64) == block_n
