"""The cpu recurrent ops (runtime/cpu_linear_attention.py: batched one-token updates, the chunked
WY form for longer chunks) against ir/linear_rules' token-by-token reference in fp64: a varlen
batch of decodes that continue their state, fresh one-token prompts, and chunks of odd lengths
that span several CHUNKs, fresh or continuing; slots the batch does not name stay untouched."""

import pytest
import torch

from kiln.ir import linear_rules
from kiln.ir.specs import LinearAttentionSpec
from kiln.runtime import cpu_linear_attention

I32 = dict(dtype=torch.int32)
# (chunk length, whether the chunk continues its sequence's state), in batch order (decodes first)
CHUNKS = [(1, True), (1, False), (1, True), (3, True), (17, False), (70, True), (131, False)]
SLOTS = [5, 0, 7, 2, 6, 1, 3]  # slot 4 is no sequence's


def _batch(g: torch.Generator):
    lengths = [n for n, _ in CHUNKS]
    query_start = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], **I32)
    seq_lens = torch.tensor([n + (int(torch.randint(1, 40, (1,), generator=g)) if cont else 0) for n, cont in CHUNKS],
                            **I32)
    return query_start, seq_lens, torch.tensor(SLOTS, **I32)


@pytest.mark.parametrize("rule, l2norm, heads", [("gated_delta", True, (2, 4)), ("gated_delta", False, (3, 3)),
                                                 ("gated", False, (2, 4))])
def test_linear_attention_matches_the_fp64_recurrence(rule, l2norm, heads):
    hk, hv = heads
    spec = LinearAttentionSpec(rule, hk, hv, 16, 8, qk_l2norm=l2norm, scale=None if l2norm else 0.1)
    g = torch.Generator().manual_seed(0)
    inputs = _batch(g)
    tokens = int(inputs[0][-1])
    # unnormalized keys of norm ~1: the delta rule stays contractive (beta |k|^2 < 2), as in trained models
    q, k = (torch.randn(tokens, hk, 16, generator=g) * (1.0 if l2norm else 0.25) for _ in range(2))
    v = torch.randn(tokens, hv, 8, generator=g)
    decay = -torch.rand(tokens, hv, generator=g) * 0.5
    beta = torch.rand(tokens, hv, generator=g) if rule == "gated_delta" else None
    state = torch.randn(8, *spec.state_shape, generator=g) * 0.1
    want_state = state.double()
    want = linear_rules.linear_attention(q, k, v, decay, want_state, *inputs, beta, spec=spec,
                                         compute_dtype=torch.float64)
    got = cpu_linear_attention.linear_attention(q, k, v, decay, state, *inputs, beta, rule=rule, group=hv // hk,
                                                scale=spec.effective_scale, qk_l2norm=l2norm)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(state.double(), want_state, atol=2e-5, rtol=1e-4)
    assert torch.equal(state[4], want_state[4].float())  # untouched


def test_chunked_prefill_equals_one_prefill_split_across_steps():
    """A 150-token prompt in one call = its first 61 tokens, then 89 more, from the stored state."""
    spec = dict(rule="gated_delta", group=2, scale=0.25, qk_l2norm=True)
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(150, 1, 16, generator=g) for _ in range(2))
    v, decay, beta = torch.randn(150, 2, 8, generator=g), -torch.rand(150, 2, generator=g), torch.rand(150, 2, generator=g)
    one = torch.zeros(1, 2, 16, 8)
    whole = cpu_linear_attention.linear_attention(q, k, v, decay, one, torch.tensor([0, 150], **I32),
                                                  torch.tensor([150], **I32), torch.tensor([0], **I32), beta, **spec)
    two = torch.zeros(1, 2, 16, 8)
    parts = [cpu_linear_attention.linear_attention(q[rows], k[rows], v[rows], decay[rows], two,
                                                   torch.tensor([0, rows.stop - rows.start], **I32),
                                                   torch.tensor([rows.stop], **I32), torch.tensor([0], **I32), beta[rows],
                                                   **spec) for rows in (slice(0, 61), slice(61, 150))]
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_causal_conv1d_matches_the_fp64_reference(bias):
    g = torch.Generator().manual_seed(2)
    inputs = _batch(g)
    tokens, channels, width = int(inputs[0][-1]), 10, 4
    x, weight = torch.randn(tokens, channels, generator=g), torch.randn(channels, width, generator=g)
    b = torch.randn(channels, generator=g) if bias else None
    state = torch.randn(8, width - 1, channels, generator=g)
    want_state = state.double()
    want = linear_rules.causal_conv1d(x, weight, want_state, *inputs, b, activation="silu", compute_dtype=torch.float64)
    got = cpu_linear_attention.causal_conv1d(x, weight, state, *inputs, b, activation="silu")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.double(), want_state)
    assert torch.equal(state[4], want_state[4].float())
