"""The reference recurrences against transformers' own torch implementations: the gated delta
rule (Qwen3-Next's torch_recurrent_gated_delta_rule) and the causal conv1d, run over one
sequence in two chunks through the state pool (the second chunk continues the first's state)."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from kiln.ir.linear_rules import causal_conv1d, linear_attention
from kiln.ir.specs import LinearAttentionSpec

I32 = dict(dtype=torch.int32)


def _two_chunks(length: int, split: int, slot: int):
    """(query_start, seq_lens, state_indices) of one sequence's first `split` tokens, then the rest."""
    return [(torch.tensor([0, n], **I32), torch.tensor([end], **I32), torch.tensor([slot], **I32))
            for n, end in ((split, split), (length - split, length))]


@pytest.mark.parametrize("heads", [(2, 2), (2, 4)])
def test_gated_delta_rule_matches_transformers(heads):
    hk, hv = heads
    spec = LinearAttentionSpec("gated_delta", hk, hv, 8, 12, qk_l2norm=True)
    g = torch.Generator().manual_seed(0)
    length, split = 23, 9
    q, k = (torch.randn(length, hk, 8, generator=g) for _ in range(2))
    v = torch.randn(length, hv, 12, generator=g)
    decay = -torch.rand(length, hv, generator=g)
    beta = torch.rand(length, hv, generator=g)
    want, want_state = hf.torch_recurrent_gated_delta_rule(q[None], k[None], v[None], decay[None], beta[None],
                                                           output_final_state=True, use_qk_l2norm_in_kernel=True)
    state = torch.full((3, *spec.state_shape), float("nan"))  # a fresh sequence never reads its slot
    out = torch.cat([linear_attention(q[rows], k[rows], v[rows], decay[rows], state, *inputs, beta[rows], spec=spec)
                     for rows, inputs in zip((slice(0, split), slice(split, None)), _two_chunks(length, split, 1))])
    torch.testing.assert_close(out, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[1], want_state[0], atol=1e-5, rtol=1e-5)
    assert state[0].isnan().all() and state[2].isnan().all()


def test_causal_conv1d_matches_transformers():
    g = torch.Generator().manual_seed(0)
    length, split, channels, width = 11, 2, 6, 4  # the first chunk is shorter than the window
    x, weight = torch.randn(length, channels, generator=g), torch.randn(channels, width, generator=g)
    want = hf.causal_conv1d_fn(x.t()[None], weight, activation="silu")[0].t()
    state = torch.full((2, width - 1, channels), float("nan"))
    out = torch.cat([causal_conv1d(x[rows], weight, state, *inputs, activation="silu")
                     for rows, inputs in zip((slice(0, split), slice(split, None)), _two_chunks(length, split, 0))])
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state[0], x[-(width - 1):])
    biased = causal_conv1d(x, weight, state, torch.tensor([0, length], **I32), torch.tensor([length], **I32),
                           torch.tensor([1], **I32), torch.ones(channels), activation=None)
    torch.testing.assert_close(biased, F.conv1d(x.t()[None], weight[:, None], torch.ones(channels), padding=width - 1,
                                                groups=channels)[0, :, :length].t(), atol=1e-6, rtol=1e-6)
