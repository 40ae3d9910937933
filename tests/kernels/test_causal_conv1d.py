"""The `causal_conv1d` kernel vs ir/linear_rules.causal_conv1d.

Every batch mixes fresh sequences (whose slots hold NaN: a kernel that read them would return
NaN) with continued ones, among them chunks shorter than K - 1 (the new state mixes old state
rows and new rows), at non-identity slots, and checks that the other slots stay bit-identical.
The oracle is the reference in fp64; bf16 runs are held to the error of the reference in bf16.
"""

import dataclasses

import pytest
import torch

from kiln.codegen.kernels import causal_conv1d
from kiln.codegen.targets import get_target
from kiln.ir.linear_rules import causal_conv1d as reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}
NUM_SLOTS = 8
# 1 token continued, 2 continued (both shorter than K - 1 = 3), 3 fresh, 17 continued, 70 fresh, 1 fresh
Q_LENS, SEQ_LENS, SLOTS = [1, 2, 3, 17, 70, 1], [6, 4, 3, 40, 70, 1], [3, 0, 5, 1, 6, 2]


def batch(channels, width, q_lens, seq_lens, slots, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    state = torch.randn(NUM_SLOTS, width - 1, channels, generator=gen).to(TORCH[dtype])
    for slot, q_len, seq_len in zip(slots, q_lens, seq_lens):
        if q_len == seq_len:
            state[slot] = float("nan")
    return dict(
        x=torch.randn(sum(q_lens), channels, generator=gen).to(TORCH[dtype]),
        weight=torch.randn(channels, width, generator=gen).to(TORCH[dtype]),
        conv_state=state,
        query_start=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        state_indices=torch.tensor(slots, dtype=torch.int32),
        bias=torch.randn(channels, generator=gen).to(TORCH[dtype]) if bias else None,
    )


def run_kernel(variant, inputs):
    """(out, conv_state after); the inputs' conv_state is left as it was."""
    state = inputs["conv_state"].clone()
    return causal_conv1d.launch(variant, **{**inputs, "conv_state": state}), state


def run_reference(inputs, activation, compute_dtype):
    """(out, conv_state after) of linear_rules.causal_conv1d computed, and its state kept, in compute_dtype."""
    state = inputs["conv_state"].to(compute_dtype, copy=True)
    return reference(**{**inputs, "conv_state": state}, activation=activation, compute_dtype=compute_dtype), state


@pytest.mark.parametrize("dtype, bias, activation, width, block_c", [
    ("fp32", True, "silu", 4, None), ("bf16", False, "silu", 4, None), ("fp32", False, None, 2, 16),
    ("bf16", True, None, 3, 16),
])
def test_matches_reference(check_close, dtype, bias, activation, width, block_c):
    """40 channels: one masked channel block, or three of 16 (the last masked)."""
    variant = causal_conv1d.choose(get_target("cpu"), dtype=dtype, channels=40, width=width, bias=bias,
                                   activation=activation)
    variant = dataclasses.replace(variant, block_c=block_c or variant.block_c)
    inputs = batch(40, width, Q_LENS, SEQ_LENS, SLOTS, dtype, bias, seed=width)
    out, state = run_kernel(variant, inputs)
    exact_out, exact_state = run_reference(inputs, activation, torch.float64)
    slots = inputs["state_indices"].long()
    # the new state is copies of inputs: exact
    assert torch.equal(state[slots].double(), exact_state[slots])
    if dtype == "fp32":
        torch.testing.assert_close(out.double(), exact_out, rtol=1e-5, atol=1e-5)
    else:
        check_close(out, exact_out, run_reference(inputs, activation, out.dtype)[0])
    untouched = [s for s in range(NUM_SLOTS) if s not in slots.tolist()]
    assert torch.equal(state[untouched], inputs["conv_state"][untouched])


def test_state_carries_across_calls():
    """Two sequences in four calls (the middle ones one token each, shorter than K - 1): the same
    outputs and final states as one call over all their tokens."""
    variant = causal_conv1d.choose(get_target("cpu"), dtype="fp32", channels=24, width=4, bias=True, activation="silu")
    whole = batch(24, 4, [25, 9], [25, 9], [4, 1], "fp32", bias=True, seed=3)
    exact_out, exact_state = run_reference(whole, "silu", torch.float64)
    state, outs = whole["conv_state"], {0: [], 1: []}
    for starts, lengths in (([0, 0], [20, 3]), ([20, 3], [1, 1]), ([21, 4], [1, 1]), ([22, 5], [3, 4])):
        rows = torch.cat([whole["query_start"][b] + start + torch.arange(n)
                          for b, (start, n) in enumerate(zip(starts, lengths))])
        step = dict(whole, x=whole["x"][rows], conv_state=state,
                    query_start=torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32),
                    seq_lens=torch.tensor([start + n for start, n in zip(starts, lengths)], dtype=torch.int32))
        out, state = run_kernel(variant, step)
        outs[0].append(out[:lengths[0]])
        outs[1].append(out[lengths[0]:])
    torch.testing.assert_close(torch.cat(outs[0] + outs[1]).double(), exact_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(state[[4, 1]].double(), exact_state[[4, 1]])


def test_choose_cache_key_and_checks():
    variant = causal_conv1d.choose(get_target("h100"), dtype="bf16", channels=8192, width=4, bias=False,
                                   activation="silu")
    assert variant.cache_key == "causal_conv1d__bf16__c8192_k4__silu__bt16_bc128__w4"
    assert causal_conv1d.grid(variant, 5) == (5, 64)
    assert "silu(b_out)" in causal_conv1d.render(variant) and "p_bias" not in causal_conv1d.render(variant)
    small = causal_conv1d.choose(get_target("cpu"), dtype="fp32", channels=8, width=4, bias=True, activation=None)
    inputs = batch(8, 4, [2], [2], [0], "fp32", bias=True, seed=0)
    with pytest.raises(ValueError, match="needs bias"):
        causal_conv1d.launch(small, **{**inputs, "bias": None})
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d.launch(small, **{**inputs, "conv_state": inputs["conv_state"][:, :2]})


def test_cross_compiles_for_every_gpu_arch_without_spills(cross_compile):
    """Qwen3-Next's conv (8192 channels, K = 4, silu) and a narrow fp32 one with bias."""
    cross_compile(causal_conv1d, lambda target: [
        causal_conv1d.choose(target, dtype="bf16", channels=8192, width=4, bias=False, activation="silu"),
        causal_conv1d.choose(target, dtype="fp32", channels=100, width=3, bias=True, activation=None),
    ])
