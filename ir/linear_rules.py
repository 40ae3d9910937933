"""Linear-attention recurrences as data, and the reference meaning of the recurrent ops.

A rule is its per-token update, written once: `step(state, q, k, v, g, beta) -> (state, o)` for
one token of one sequence, all heads at once (state [Hv, Dk, Dv]; q, k [Hv, Dk] already expanded
to the value heads, normalized and scaled; v [Hv, Dv]; g [Hv], the log of the per-head decay;
beta [Hv] or None; o [Hv, Dv]). The reference ops below run it token by token; the chunked
kernels (runtime/cpu_linear_attention.py, the Triton templates) compute the same recurrence a
chunk at a time and are tested against it.

  gated_delta  Gated DeltaNet (Qwen3-Next): S <- exp(g) S;  S <- S + k (beta (v - S^T k))^T;  o = S^T q
  gated        gated linear attention with a scalar decay per head, Mamba2's SSD with q = C,
               k = B, v = dt x, g = dt A:  S <- exp(g) S + k v^T;  o = S^T q

The state pool holds, per sequence and layer, the recurrent state (fp32) and the causal conv1d's
last K - 1 inputs. A sequence whose chunk starts at position 0 (seq_lens[b] equals its chunk
length) starts from zero states, whatever its slot held: slots need no clearing, and a
preempted sequence recomputes from scratch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.ir.specs import LinearAttentionSpec

Step = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _gated_delta_step(state, q, k, v, g, beta):
    state = state * g.exp()[:, None, None]
    delta = (v - torch.einsum("hkv,hk->hv", state, k)) * beta[:, None]
    state = state + k[:, :, None] * delta[:, None, :]
    return state, torch.einsum("hkv,hk->hv", state, q)


def _gated_step(state, q, k, v, g, beta):
    state = state * g.exp()[:, None, None] + k[:, :, None] * v[:, None, :]
    return state, torch.einsum("hkv,hk->hv", state, q)


@dataclass(frozen=True)
class RecurrenceRule:
    name: str
    step: Step
    uses_beta: bool  # the op takes a beta input [T, Hv]


RULES: dict[str, RecurrenceRule] = {
    "gated_delta": RecurrenceRule("gated_delta", _gated_delta_step, uses_beta=True),
    "gated": RecurrenceRule("gated", _gated_step, uses_beta=False),
}

ACTIVATIONS: dict[str | None, Callable[[torch.Tensor], torch.Tensor]] = {None: lambda x: x, "silu": F.silu}


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (as flash-linear-attention and transformers)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def sequences(query_start: torch.Tensor, seq_lens: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Per sequence: its rows [start, end) and whether its chunk starts at position 0 (a fresh state)."""
    bounds = query_start.tolist()
    return [(bounds[b], bounds[b + 1], int(length) == bounds[b + 1] - bounds[b])
            for b, length in enumerate(seq_lens.tolist())]


def prepare_qk(q: torch.Tensor, k: torch.Tensor, spec: LinearAttentionSpec, dtype: torch.dtype):
    """q, k [T, Hk, Dk] -> [T, Hv, Dk] in `dtype`: expanded to the value heads, L2-normalized
    when the spec says, q scaled."""
    group = spec.num_v_heads // spec.num_k_heads
    q, k = (x.to(dtype).repeat_interleave(group, dim=1) for x in (q, k))
    if spec.qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q * spec.effective_scale, k


def linear_attention(q, k, v, g, state, query_start, seq_lens, state_indices, beta=None, *,
                     spec: LinearAttentionSpec, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The recurrence of `spec.rule` over each sequence's chunk, token by token.

    q, k: [T, Hk, Dk]; v: [T, Hv, Dv]; g, beta: [T, Hv]; state: [NS, Hv, Dk, Dv] (fp32, read at
    state_indices[b] unless the chunk starts the sequence, written back after it). Returns
    [T, Hv, Dv] in v's dtype (computed in fp32), or computed and returned in `compute_dtype`."""
    compute = compute_dtype or torch.float32
    rule = RULES[spec.rule]
    out = torch.empty(v.shape, dtype=compute_dtype or v.dtype)
    qs, ks = prepare_qk(q, k, spec, compute)
    vs, gs = v.to(compute), g.to(compute)
    betas = beta.to(compute) if beta is not None else None
    for b, (start, end, fresh) in enumerate(sequences(query_start, seq_lens)):
        slot = int(state_indices[b])
        s = torch.zeros(spec.state_shape, dtype=compute) if fresh else state[slot].to(compute)
        for t in range(start, end):
            s, out[t] = rule.step(s, qs[t], ks[t], vs[t], gs[t], betas[t] if betas is not None else None)
        state[slot] = s.to(state.dtype)
    return out


def causal_conv1d(x, weight, conv_state, query_start, seq_lens, state_indices, bias=None, *,
                  activation: str | None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A depthwise causal convolution over each sequence's tokens, continuing from its state.

    x: [T, C]; weight: [C, K]; conv_state: [NS, K - 1, C], the sequence's previous K - 1 inputs
    (zeros for a chunk that starts the sequence), replaced by its last K - 1 inputs after the
    chunk; bias: [C] or None. out[t, c] = act(bias[c] + sum_j weight[c, j] * xs[t + j, c]) where xs
    is the state's rows then the chunk's. Returns [T, C] in x's dtype (computed in fp32)."""
    compute = compute_dtype or torch.float32
    width = weight.shape[1]
    out = torch.empty(x.shape, dtype=compute_dtype or x.dtype)
    w = weight.to(compute).t()  # [K, C]
    act = ACTIVATIONS[activation]
    for b, (start, end, fresh) in enumerate(sequences(query_start, seq_lens)):
        slot = int(state_indices[b])
        prior = torch.zeros(width - 1, x.shape[1], dtype=compute) if fresh else conv_state[slot].to(compute)
        xs = torch.cat([prior, x[start:end].to(compute)])
        for t in range(end - start):
            y = (xs[t:t + width] * w).sum(0) + (bias.to(compute) if bias is not None else 0)
            out[start + t] = act(y).to(out.dtype)
        conv_state[slot] = xs[xs.shape[0] - (width - 1):].to(conv_state.dtype)
    return out


def linear_attention_node(node, args, bindings) -> torch.Tensor:
    """The `linear_attention` op: (q, k, v, g, state, query_start, seq_lens, state_indices[, beta])."""
    return linear_attention(*args, spec=node.attrs["spec"])


def causal_conv1d_node(node, args, bindings) -> torch.Tensor:
    """The `causal_conv1d` op: (x, weight, conv_state, query_start, seq_lens, state_indices[, bias])."""
    return causal_conv1d(*args, activation=node.attrs["activation"])
