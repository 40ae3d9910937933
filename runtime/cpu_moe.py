"""The cpu target's mixture of experts: tokens sorted by expert, one GEMM pair per expert that
received tokens (experts without tokens cost nothing), the routing weights applied to each
expert's rows, and the rows summed back per token.

Layouts as the `moe` op's (ir/reference.moe): x [T, K], weights and ids [T, top_k], w_gate_up
[E, 2I, K] (gate rows first), w_down [E, N, I], biases [E, 2I] and [E, N] or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activation(gate_up: torch.Tensor, activation: str, alpha: float | None, limit: float | None) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    assert alpha is not None and limit is not None, "swiglu_clamped needs alpha and limit"
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
        b_gate_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None, *, activation: str,
        alpha: float | None, limit: float | None) -> torch.Tensor:
    """[T, N]: sum over each token's top_k experts of weight * expert(x[t])."""
    top_k = ids.shape[1]
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    tokens = order // top_k
    rows = x.index_select(0, tokens)
    out = torch.empty(rows.shape[0], w_down.shape[1], dtype=x.dtype)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        h = F.linear(rows[start:end], w_gate_up[expert], None if b_gate_up is None else b_gate_up[expert])
        out[start:end] = F.linear(_activation(h, activation, alpha, limit), w_down[expert],
                                  None if b_down is None else b_down[expert])
        start = end
    out.mul_(weights.reshape(-1).index_select(0, order).to(x.dtype)[:, None])
    return torch.zeros(x.shape[0], w_down.shape[1], dtype=x.dtype).index_add_(0, tokens, out)
