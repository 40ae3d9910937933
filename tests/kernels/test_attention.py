"""Paged attention kernels (varlen prefill, decode with and without split-K) vs naive torch.

Every case runs on shuffled physical blocks with garbage (-7) block-table tails; the oracle is
`paged_attention_reference(..., exact=True)` (fp64), the same-dtype baseline the reference in
the kernel's dtype.
"""

import math

import pytest
import torch

from kiln.codegen.kernels import attention_decode, attention_prefill
from kiln.codegen.kernels.attention import AttentionParams
from kiln.codegen.kernels.attention_reference import make_paged_step, paged_attention_reference
from kiln.codegen.targets import get_target
from kiln.errors import KilnError

# Triton 3.6's interpreter gives program ids shape [1]; a runtime loop bound derived from one
# makes numpy < 2.4 warn on every loop (numpy >= 2.4 would fail: ENVIRONMENT.md).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# name -> (attention params but dtype, q_lens, seq_lens). Lengths are not multiples of the tiles.
PREFILL_CASES = {
    # a decode, a whole prompt, a chunk starting mid-context, a one-token sequence
    "mixed_h9_kv3_d64": (dict(num_heads=9, num_kv_heads=3, head_dim=64, page_size=16), [1, 19, 6, 1], [37, 19, 40, 1]),
    "window_h9_kv3_d128": (dict(num_heads=9, num_kv_heads=3, head_dim=128, page_size=16, window=13),
                           [23, 1, 5], [23, 30, 44]),
    "softcap_mha_page5_scale": (dict(num_heads=4, num_kv_heads=4, head_dim=64, page_size=5, softcap=3.0, scale=0.3),
                                [1, 9], [21, 12]),
    "single_token": (dict(num_heads=9, num_kv_heads=3, head_dim=64, page_size=16), [1], [1]),
    "sinks_window_h8_kv2": (dict(num_heads=8, num_kv_heads=2, head_dim=64, page_size=16, window=16, sinks=True),
                            [1, 20], [50, 26]),
}
DECODE_CASES = {
    "h9_kv3_d64": (dict(num_heads=9, num_kv_heads=3, head_dim=64, page_size=16), [37, 1, 100, 16]),
    "window_softcap_h9_kv3_d128": (dict(num_heads=9, num_kv_heads=3, head_dim=128, page_size=16, window=20,
                                        softcap=30.0), [45, 7, 21]),
    "sinks_h8_kv2": (dict(num_heads=8, num_kv_heads=2, head_dim=64, page_size=16, sinks=True), [33, 1, 70]),
}


def paged_inputs(attn: AttentionParams, q_lens, seq_lens, device, seed):
    """q [T, H, D], caches with room for every sequence plus spare blocks, in attn's dtype, and
    the step; plus sinks [H] (None unless attn has sinks) in the last place."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(n / attn.page_size) for n in seq_lens) + 3
    step = make_paged_step(q_lens, seq_lens, attn.page_size, num_blocks, generator, device=device)
    cache_shape = (num_blocks, attn.page_size, attn.num_kv_heads, attn.head_dim)
    q, k_cache, v_cache = (
        torch.randn(shape, generator=generator).to(attn.torch_dtype).to(device)
        for shape in ((sum(q_lens), attn.num_heads, attn.head_dim), cache_shape, cache_shape)
    )
    sinks = (2 * torch.randn(attn.num_heads, generator=generator)).to(attn.torch_dtype).to(device) if attn.sinks else None
    return q, k_cache, v_cache, step, sinks


def references(attn: AttentionParams, q, k_cache, v_cache, step, sinks):
    """(exact fp64 oracle, same-dtype baseline)."""
    args = (q, k_cache, v_cache, step.query_start, step.seq_lens, step.block_tables)
    options = dict(scale=attn.scale, window=attn.window, softcap=attn.softcap, sinks=sinks)
    return paged_attention_reference(*args, **options, exact=True), paged_attention_reference(*args, **options)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_matches_reference(device, target, check_close, dtype, case):
    params, q_lens, seq_lens = PREFILL_CASES[case]
    attn = AttentionParams(dtype, **params)
    q, k_cache, v_cache, step, sinks = paged_inputs(attn, q_lens, seq_lens, device, seed=len(case))
    variant = attention_prefill.choose(target, attn)
    out = attention_prefill.launch(variant, q, k_cache, v_cache, step.query_start, step.seq_lens, step.block_tables,
                                   sinks)
    check_close(out, *references(attn, q, k_cache, v_cache, step, sinks))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_with_and_without_split_k_matches_reference(device, target, check_close, dtype, case):
    params, seq_lens = DECODE_CASES[case]
    attn = AttentionParams(dtype, **params)
    q, k_cache, v_cache, step, sinks = paged_inputs(attn, [1] * len(seq_lens), seq_lens, device, seed=len(case))
    exact, same_dtype = references(attn, q, k_cache, v_cache, step, sinks)
    direct = attention_decode.launch(attention_decode.choose(target, attn, split_k=False), q, k_cache, v_cache,
                                     step.seq_lens, step.block_tables, sinks=sinks)
    check_close(direct, exact, same_dtype)
    # 3 splits: uneven chunks; 8: more splits than a short sequence has tiles (empty partials)
    for num_splits in (3, 8):
        split = attention_decode.launch(attention_decode.choose(target, attn, split_k=True), q, k_cache, v_cache,
                                        step.seq_lens, step.block_tables, sinks=sinks, num_splits=num_splits)
        check_close(split, exact, same_dtype)
        # and agrees with the direct kernel up to fp32 sums in another order (+ one output rounding)
        tolerance = 1e-5 if q.dtype == torch.float32 else torch.finfo(q.dtype).eps
        torch.testing.assert_close(split.float(), direct.float(), rtol=tolerance, atol=tolerance)


def poison_before(cache: torch.Tensor, block_tables: torch.Tensor, seq: int, first_kept: int) -> None:
    """Writes NaN into the cache at sequence `seq`'s positions < first_kept (in place)."""
    page_size = cache.shape[1]
    for position in range(first_kept):
        cache[block_tables[seq, position // page_size], position % page_size] = float("nan")


def test_sliding_window_never_reads_keys_before_its_first_tile(device, target, check_close):
    """Keys wholly outside every window are NaN: a kernel that read them would return NaN."""
    attn = AttentionParams("fp32", num_heads=9, num_kv_heads=3, head_dim=64, page_size=16, window=10)
    q_lens, seq_lens = [4, 1], [60, 45]
    q, k_cache, v_cache, step, _ = paged_inputs(attn, q_lens, seq_lens, device, seed=3)
    exact, same_dtype = references(attn, q, k_cache, v_cache, step, None)
    prefill = attention_prefill.choose(target, attn)
    for seq, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        first_query = seq_len - q_len
        # the prefill kernel starts at the tile holding the first query's window start
        first_kept = (first_query - attn.window + 1) // prefill.block_n * prefill.block_n
        for cache in (k_cache, v_cache):
            poison_before(cache, step.block_tables, seq, first_kept)
    out = attention_prefill.launch(prefill, q, k_cache, v_cache, step.query_start, step.seq_lens, step.block_tables)
    check_close(out, exact, same_dtype)

    last = step.query_start[1:] - 1
    decode_q, decode_exact, decode_same = q[last], exact[last], same_dtype[last]
    for seq, seq_len in enumerate(seq_lens):  # decode starts exactly at the window
        for cache in (k_cache, v_cache):
            poison_before(cache, step.block_tables, seq, seq_len - attn.window)
    for split_k, num_splits in ((False, 1), (True, 4)):
        out = attention_decode.launch(attention_decode.choose(target, attn, split_k=split_k), decode_q.contiguous(),
                                      k_cache, v_cache, step.seq_lens, step.block_tables, num_splits=num_splits)
        check_close(out, decode_exact, decode_same)


H100 = get_target("h100")  # 132 SMs


@pytest.mark.parametrize(
    "batch, num_kv_heads, max_context, expected, why",
    [
        (64, 8, 8192, 1, "512 programs already cover 132 SMs"),
        (1, 8, 8192, 17, "ceil(132 / 8) splits fill the SMs; 8192 / 17 >= 256 tokens each"),
        (1, 1, 100_000, 32, "132 wanted, capped at MAX_SPLITS"),
        (2, 4, 1000, 3, "17 wanted, but only 1000 // 256 = 3 splits keep 256 tokens each"),
        (1, 8, 200, 1, "a context under 2 x 256 tokens is not split"),
        (0, 8, 4096, 1, "an empty batch"),
    ],
)
def test_choose_num_splits(batch, num_kv_heads, max_context, expected, why):
    assert attention_decode.choose_num_splits(batch, num_kv_heads, max_context, H100) == expected, why


def test_choose_num_splits_fills_more_sms_on_a_bigger_gpu_and_never_splits_on_cpu():
    assert attention_decode.choose_num_splits(1, 8, 32768, get_target("b200")) == 19  # ceil(148 / 8)
    assert attention_decode.choose_num_splits(1, 8, 32768, get_target("a100")) == 14  # ceil(108 / 8)
    assert attention_decode.choose_num_splits(1, 8, 32768, get_target("cpu")) == 1


def test_bad_layer_shapes_are_user_errors():
    with pytest.raises(KilnError, match="multiple of num_kv_heads"):
        AttentionParams("bf16", num_heads=9, num_kv_heads=2, head_dim=64, page_size=16)
    with pytest.raises(KilnError, match="not supported"):
        AttentionParams("int8", num_heads=8, num_kv_heads=2, head_dim=64, page_size=16)


def test_launch_rejects_a_cache_of_another_page_size(device, target):
    attn = AttentionParams("fp32", num_heads=4, num_kv_heads=2, head_dim=64, page_size=16)
    q, k_cache, v_cache, step, _ = paged_inputs(attn, [1], [5], device, seed=0)
    variant = attention_decode.choose(target, attn, split_k=False)
    with pytest.raises(ValueError, match="k_cache"):
        attention_decode.launch(variant, q, k_cache.view(-1, 8, 2, 64), v_cache.view(-1, 8, 2, 64),
                                step.seq_lens, step.block_tables)
    with pytest.raises(ValueError, match="split_k variant"):
        attention_decode.launch(variant, q, k_cache, v_cache, step.seq_lens, step.block_tables, num_splits=2)


def test_cache_keys_name_every_variant_parameter(target):
    attn = AttentionParams("bf16", num_heads=9, num_kv_heads=3, head_dim=64, page_size=16, window=512, softcap=30.0)
    prefill = attention_prefill.Variant(attn, block_m=64, block_n=32, num_warps=4, num_stages=2)
    assert prefill.cache_key == "attention_prefill__bf16__h9_kv3_d64__p16__swa512__cap30__bm64_bn32__w4_s2"
    decode = attention_decode.Variant(attn, split_k=True, block_n=64, num_warps=4, num_stages=3)
    assert decode.cache_key == "attention_decode__bf16__h9_kv3_d64__p16__swa512__cap30__splitk__bn64__w4_s3"
    source = attention_prefill.render(prefill)
    assert "softcap_scores(b_s, 30.0)" in source and "- 512" in source
    plain = attention_prefill.render(attention_prefill.Variant(AttentionParams("bf16", 9, 3, 64, 16), 64, 32, 4, 2))
    assert "softcap" not in plain and "kv_begin = 0" in plain and "sparse" not in plain
    sparse = AttentionParams("bf16", num_heads=9, num_kv_heads=3, head_dim=64, page_size=16, block_sparse=(64, 4, 8))
    decode = attention_decode.Variant(sparse, split_k=False, block_n=32, num_warps=4, num_stages=3)
    assert decode.cache_key == "attention_decode__bf16__h9_kv3_d64__p16__sparse64_local4_stride8__bn32__w4_s3"
    source = attention_decode.render(decode)
    assert "LAYOUT_BLOCK = tl.constexpr(64)" in source and "VERTICAL_STRIDE = tl.constexpr(8)" in source
    assert "for i_kv_tile in range(0, num_kv_tiles)" in source and "kv_begin" not in source


def test_params_from_ir_spec():
    from kiln.ir.specs import AttentionKind, AttentionSpec, BlockSparseLayout, KVLayout

    spec = AttentionSpec(AttentionKind.SLIDING_WINDOW, num_heads=8, num_kv_heads=2, head_dim=64, window=128,
                         softcap=30.0, sinks=True, kv_layout=KVLayout(block_size=32))
    assert AttentionParams.from_spec(spec, "bf16") == AttentionParams(
        "bf16", num_heads=8, num_kv_heads=2, head_dim=64, page_size=32, window=128, softcap=30.0, sinks=True)
    sparse = AttentionSpec(AttentionKind.BLOCK_SPARSE, num_heads=8, num_kv_heads=2, head_dim=64,
                           block_sparse=BlockSparseLayout(block_size=64, local_blocks=4, vertical_stride=8))
    assert AttentionParams.from_spec(sparse, "bf16") == AttentionParams(
        "bf16", num_heads=8, num_kv_heads=2, head_dim=64, page_size=16, block_sparse=(64, 4, 8))
    with pytest.raises(KilnError, match="causal attention only"):
        AttentionParams.from_spec(AttentionSpec(AttentionKind.DENSE, 8, 2, 64, causal=False), "bf16")
