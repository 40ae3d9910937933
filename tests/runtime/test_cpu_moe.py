"""The cpu target's mixture of experts (runtime/cpu_moe.py) against the oracle, ir.reference.moe,
with its expert weights plain and packed as the executor hands them (`pack_experts`): ragged
expert loads (an expert with no token, one that receives every token, the others 3 to 6 of 9
tokens; T = 1), both activations (swiglu_clamped with a limit that clamps), with and without
biases; fp32 to rounding, bf16 (whose experts of more than a few rows multiply fp32
weights converted CONVERT_ROWS rows at a time: made small here so that several chunks and a
ragged last one run) loosely."""

import pytest
import torch

from kiln.ir import reference
from kiln.runtime import cpu_moe

E, K, INTER, N, TOP_K = 6, 32, 24, 40, 3  # experts, hidden, intermediate, out, top_k
ACTIVATIONS = {"silu": dict(activation="silu", alpha=None, limit=None),
               "swiglu_clamped": dict(activation="swiglu_clamped", alpha=1.702, limit=0.5)}


def routing(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [T, TOP_K] fp32 (summing to 1), ids [T, TOP_K]: expert 1 gets every token, expert 0
    none, experts 2..5 between 1 and T rows."""
    gen = torch.Generator().manual_seed(tokens)
    others = torch.stack([torch.randperm(E - 2, generator=gen)[: TOP_K - 1] + 2 for _ in range(tokens)])
    ids = torch.cat([torch.ones(tokens, 1, dtype=torch.int64), others], dim=1)
    weights = torch.rand(tokens, TOP_K, generator=gen) + 0.1
    return weights / weights.sum(dim=1, keepdim=True), ids


def layer(bias: bool) -> list[torch.Tensor | None]:
    """w_gate_up [E, 2 INTER, K], w_down [E, N, INTER], biases or None (fp32, scaled so that swiglu_clamped's
    limit of 0.5 clamps some gate and up values)."""
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(E, 2 * INTER, K, generator=gen) * 0.4, torch.randn(E, N, INTER, generator=gen) * 0.3]
    biases = [torch.randn(E, 2 * INTER, generator=gen) * 0.3, torch.randn(E, N, generator=gen) * 0.3]
    return tensors + (biases if bias else [None, None])


@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_fp32_matches_the_reference(tokens, activation, bias, packed):
    x = torch.randn(tokens, K, generator=torch.Generator().manual_seed(2))
    weights, ids = routing(tokens)
    w_gate_up, w_down, b_gate_up, b_down = layer(bias)
    want = reference.moe(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, **ACTIVATIONS[activation])
    if packed:
        w_gate_up, w_down = cpu_moe.pack_experts(w_gate_up), cpu_moe.pack_experts(w_down)
    got = cpu_moe.moe(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, **ACTIVATIONS[activation])
    assert got.dtype == torch.float32 and got.shape == (tokens, N)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_bf16_matches_the_reference_loosely(tokens, activation, bias, monkeypatch):
    monkeypatch.setattr(cpu_moe, "CONVERT_ROWS", 16)  # 2I = 48 rows: 3 chunks, N = 40: 3 with a ragged last
    monkeypatch.setattr(cpu_moe, "BF16_DIRECT_ROWS_PER_THREAD", 1)  # 1-row experts in bf16, 9-row expert 1 converted
    x = torch.randn(tokens, K, generator=torch.Generator().manual_seed(2)).bfloat16()
    weights, ids = routing(tokens)
    params = [None if t is None else t.bfloat16() for t in layer(bias)]
    assert cpu_moe.pack_experts(params[0]) is params[0]  # bf16 experts are not packed
    want = reference.moe(x.float(), weights, ids, *[None if t is None else t.float() for t in params],
                         **ACTIVATIONS[activation])
    got = cpu_moe.moe(x, weights, ids, *params, **ACTIVATIONS[activation])
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, N)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_the_clamped_activation_clamps():
    """The swiglu_clamped cases above exercise the clamp: some gate and up values exceed the limit."""
    x = torch.randn(9, K, generator=torch.Generator().manual_seed(2))
    h = torch.einsum("tk,enk->ten", x, layer(False)[0])
    assert (h[..., :INTER] > 0.5).any() and (h[..., INTER:].abs() > 0.5).any()
