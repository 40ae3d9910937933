"""The `gated_delta` kernels (recurrent and chunked forms, both rules) vs ir/linear_rules.py.

Every batch mixes fresh sequences (whose slots hold NaN: a kernel that read them would return
NaN) with continued ones, at non-identity slots, and checks that the other slots stay
bit-identical. The oracle is `linear_attention(..., compute_dtype=float64)`; bf16 runs are held
to the error of the same reference computed in bf16.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kiln.codegen.kernels import gated_delta
from kiln.codegen.targets import get_target
from kiln.ir.linear_rules import linear_attention
from kiln.ir.specs import LinearAttentionSpec

# Triton 3.6's interpreter gives program ids shape [1]; loop bounds derived from one warn in numpy < 2.4.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}
NUM_SLOTS = 8
# (q_lens, seq_lens, slots) per form: a 1-token fresh sequence, 3 fresh, 17 continued, a continued
# decode; the chunked form also a fresh 70 (chunks of 16: four and a part). The interpreter takes
# ~10 ms a token for the recurrent form: it gets its long chunk in test_state_carries_across_calls.
BATCHES = {"recurrent": ([1, 3, 17, 1], [1, 3, 30, 9], [3, 0, 5, 1]),
           "chunked": ([1, 3, 17, 70, 1], [1, 3, 30, 70, 9], [3, 0, 5, 6, 1])}


def batch(spec: LinearAttentionSpec, q_lens, seq_lens, slots, dtype: str, seed: int):
    """The op's inputs for `spec` (q, k, v, beta in dtype; g fp32 <= 0; a random fp32 state pool,
    NaN at the slots of sequences that start fresh), as a dict."""
    gen = torch.Generator().manual_seed(seed)
    tokens, hk, hv, dk, dv = sum(q_lens), spec.num_k_heads, spec.num_v_heads, spec.head_k_dim, spec.head_v_dim
    qk_scale = 1.0 if spec.qk_l2norm else dk ** -0.5  # unnormalized keys of norm ~1 keep the delta rule stable
    state = torch.randn(NUM_SLOTS, hv, dk, dv, generator=gen) * 0.5
    for slot, q_len, seq_len in zip(slots, q_lens, seq_lens):
        if q_len == seq_len:
            state[slot] = float("nan")
    return dict(
        q=(torch.randn(tokens, hk, dk, generator=gen) * qk_scale).to(TORCH[dtype]),
        k=(torch.randn(tokens, hk, dk, generator=gen) * qk_scale).to(TORCH[dtype]),
        v=torch.randn(tokens, hv, dv, generator=gen).to(TORCH[dtype]),
        g=-F.softplus(torch.randn(tokens, hv, generator=gen) - 1.0),
        state=state,
        query_start=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        state_indices=torch.tensor(slots, dtype=torch.int32),
        beta=torch.sigmoid(torch.randn(tokens, hv, generator=gen)).to(TORCH[dtype]) if spec.rule == "gated_delta" else None,
    )


def run_kernel(variant, inputs):
    """(out, state after) of the kernel; the inputs' state is left as it was."""
    state = inputs["state"].clone()
    out = gated_delta.launch(variant, **{**inputs, "state": state})
    return out, state


def run_reference(spec, inputs, compute_dtype):
    """(out, state after) of linear_rules.linear_attention computed in compute_dtype (an fp64
    state for fp64); the inputs' state is left as it was."""
    state = inputs["state"].to(torch.float64 if compute_dtype == torch.float64 else torch.float32, copy=True)
    out = linear_attention(**{**inputs, "state": state}, spec=spec, compute_dtype=compute_dtype)
    return out, state


def variant_for(spec, dtype, form, **tiles):
    """The cpu target's variant of `form` ("recurrent" or "chunked"), with `tiles` replaced."""
    variant = gated_delta.choose(get_target("cpu"), spec, dtype, chunked=form == "chunked")
    return dataclasses.replace(variant, **tiles)


def assert_fp32_close(actual, exact):
    """Within 1e-4 of the fp64 oracle, relative to its largest magnitude."""
    scale = exact.abs().max().item()
    torch.testing.assert_close(actual.double(), exact, rtol=1e-4, atol=1e-4 * scale)


def check(variant, spec, inputs, check_close):
    """Runs the kernel on `inputs` and checks its output and state against the oracle, and that
    the slots no sequence owns are bit-identical."""
    out, state = run_kernel(variant, inputs)
    exact_out, exact_state = run_reference(spec, inputs, torch.float64)
    slots = inputs["state_indices"].long()
    if out.dtype == torch.float32:
        assert_fp32_close(out, exact_out)
        assert_fp32_close(state[slots], exact_state[slots])
    else:
        same_out, same_state = run_reference(spec, inputs, out.dtype)
        check_close(out, exact_out, same_out)
        check_close(state[slots], exact_state[slots], same_state[slots])
    untouched = [s for s in range(NUM_SLOTS) if s not in slots.tolist()]
    assert torch.equal(state[untouched], inputs["state"][untouched])


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
@pytest.mark.parametrize("rule, qk_l2norm, dtype", [
    ("gated_delta", True, "fp32"), ("gated_delta", False, "bf16"), ("gated", False, "fp32"), ("gated", True, "bf16"),
])
def test_matches_reference(check_close, form, rule, qk_l2norm, dtype):
    """Hv = 2 Hk, a head_k_dim that is not a power of two; odd lengths, fresh and continued."""
    spec = LinearAttentionSpec(rule, num_k_heads=1, num_v_heads=2, head_k_dim=24, head_v_dim=16, qk_l2norm=qk_l2norm)
    inputs = batch(spec, *BATCHES[form], dtype, seed=len(rule) + qk_l2norm)
    check(variant_for(spec, dtype, form), spec, inputs, check_close)


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_two_key_heads_several_state_tiles_and_key_slices(check_close, form):
    """Two q/k heads of two value heads each; head_v_dim 40 over two BLOCK_V tiles (the second
    masked); the chunked form's key dim over three slices (the last masked)."""
    spec = LinearAttentionSpec("gated_delta", num_k_heads=2, num_v_heads=4, head_k_dim=40, head_v_dim=40, scale=0.3,
                               qk_l2norm=True)
    tiles = dict(block_v=32, block_k=16) if form == "chunked" else dict(block_v=32)
    inputs = batch(spec, [9, 1], [9, 5], [2, 7], "fp32", seed=5)
    check(variant_for(spec, "fp32", form, **tiles), spec, inputs, check_close)


def test_state_carries_across_calls():
    """Two sequences in three calls (chunked, recurrent, then a chunked decode step): the same
    outputs and final states as one pass over all their tokens."""
    spec = LinearAttentionSpec("gated_delta", num_k_heads=1, num_v_heads=2, head_k_dim=32, head_v_dim=16, qk_l2norm=True)
    chunked, recurrent = variant_for(spec, "fp32", "chunked"), variant_for(spec, "fp32", "recurrent")
    whole = batch(spec, [41, 22], [41, 22], [4, 1], "fp32", seed=7)
    exact_out, exact_state = run_reference(spec, whole, torch.float64)
    state, outs = whole["state"], {0: [], 1: []}
    for starts, lengths, variant in (([0, 0], [19, 7], chunked), ([19, 7], [21, 14], recurrent),
                                     ([40, 21], [1, 1], chunked)):
        rows = torch.cat([whole["query_start"][b] + start + torch.arange(n)
                          for b, (start, n) in enumerate(zip(starts, lengths))])
        step = {**{name: whole[name][rows] for name in ("q", "k", "v", "g", "beta")}, "state": state,
                "query_start": torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32),
                "seq_lens": torch.tensor([start + n for start, n in zip(starts, lengths)], dtype=torch.int32),
                "state_indices": whole["state_indices"]}
        out, state = run_kernel(variant, step)
        outs[0].append(out[:lengths[0]])
        outs[1].append(out[lengths[0]:])
    assert_fp32_close(torch.cat(outs[0] + outs[1]), exact_out)
    slots = whole["state_indices"].long()
    assert_fp32_close(state[slots], exact_state[slots])


def test_choose_and_cache_keys():
    qwen3_next = LinearAttentionSpec("gated_delta", num_k_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128,
                                     qk_l2norm=True)
    h100 = get_target("h100")
    chunked = gated_delta.choose(h100, qwen3_next, "bf16", chunked=True)
    assert (chunked.chunk, chunked.block_k, chunked.block_v, chunked.k_slices) == (16, 64, 32, 2)
    assert chunked.cache_key == ("gated_delta__gated_delta__bf16_gfp32__hk16_hv32_dk128_dv128__scale0p0883883__l2norm"
                                 "__c16_bk64_bv32__w4_s1")
    assert gated_delta.grid(chunked, 3) == (3, 128)
    recurrent = gated_delta.choose(h100, qwen3_next, "bf16", chunked=False)
    assert (recurrent.chunk, recurrent.block_k, recurrent.k_slices, recurrent.block_v) == (0, 128, 1, 32)
    assert gated_delta.choose(h100, qwen3_next, "fp32", chunked=True).chunk == 0  # fp32 dots would spill
    assert gated_delta.choose(h100, dataclasses.replace(qwen3_next, head_k_dim=512), "bf16", chunked=True).chunk == 0
    assert gated_delta.choose(get_target("cpu"), qwen3_next, "fp32", chunked=True).chunk == 16  # interpreted
    source = gated_delta.render(chunked)
    assert "unit_lower_solve" in source and "b_h1 =" in source and "p_beta" in source
    gated = gated_delta.render(gated_delta.choose(h100, dataclasses.replace(qwen3_next, rule="gated", qk_l2norm=False),
                                                  "bf16", chunked=True))
    assert "p_beta" not in gated and "unit_lower_solve" not in gated and "rsqrt" not in gated
    with pytest.raises(ValueError, match="one slice"):
        dataclasses.replace(recurrent, block_k=64)


def test_launch_checks_its_arguments():
    spec = LinearAttentionSpec("gated_delta", num_k_heads=1, num_v_heads=2, head_k_dim=16, head_v_dim=16)
    inputs = batch(spec, [2], [2], [0], "fp32", seed=0)
    variant = variant_for(spec, "fp32", "recurrent")
    with pytest.raises(ValueError, match="needs beta"):
        gated_delta.launch(variant, **{**inputs, "beta": None})
    with pytest.raises(ValueError, match="state"):
        gated_delta.launch(variant, **{**inputs, "state": inputs["state"].transpose(2, 3)})
    with pytest.raises(ValueError, match="state_indices"):
        gated_delta.launch(variant, **{**inputs, "state_indices": inputs["state_indices"].long()})


def test_cross_compiles_for_every_gpu_arch_without_spills(cross_compile):
    """Qwen3-Next's layer in both forms, and a Mamba2-like gated layer (one q/k head, no L2 norm)."""
    qwen3_next = LinearAttentionSpec("gated_delta", num_k_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128,
                                     qk_l2norm=True)
    mamba2 = LinearAttentionSpec("gated", num_k_heads=1, num_v_heads=24, head_k_dim=128, head_v_dim=64, scale=1.0)
    cross_compile(gated_delta, lambda target: [
        gated_delta.choose(target, qwen3_next, "bf16", chunked=True),
        gated_delta.choose(target, qwen3_next, "bf16", chunked=False),
        gated_delta.choose(target, mamba2, "bf16", chunked=True),
    ])
