"""The building blocks a model spec is made of.

Each block is an `nn.Module` that the tracer keeps as ONE IR node (a leaf): `Linear`,
`Embedding`, `RMSNorm`, `Rope`, `Attention`, `LinearAttention`, `CausalConv1d`, `Experts`,
`LastTokens`. Everything else a spec writes
(`+`, `*`, `F.silu`, `view`, `split`, ...) becomes elementwise/data IR ops. Parameters are
created on the `meta` device: a spec costs no memory until the loader supplies weights.
The forwards below give each block's meaning in torch; kiln itself never runs a spec
eagerly (it runs the compiled graph), except the blocks that need the step context (`Attention`:
the paged KV cache; `LinearAttention`, `CausalConv1d`: the state pool).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.ir import reference
from kiln.ir.specs import AttentionSpec, LinearAttentionSpec, RopeSpec


def meta_parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Linear(nn.Module):
    """y = x @ weight^T + bias. weight: [out_features, in_features], bias: [out_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = meta_parameter(out_features, in_features)
        self.bias = meta_parameter(out_features) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """ids: [T] -> [T, dim]. weight: [num_embeddings, dim]."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = meta_parameter(num_embeddings, dim)

    def forward(self, ids):
        return F.embedding(ids.long(), self.weight)


class RMSNorm(nn.Module):
    """RMS normalization over the last dim (`dim` channels), in fp32, scaled by weight [dim] (none
    when not `weight`: a spec that scales after a reshape, as Mamba2's grouped norm)."""

    def __init__(self, dim: int, eps: float, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = meta_parameter(dim) if weight else None

    def forward(self, x):
        return reference.rms_norm(x, self.weight, self.eps)


class Rope(nn.Module):
    """Rotary embedding of x: [T, H, head_dim] at positions: [T]."""

    def __init__(self, spec: RopeSpec):
        super().__init__()
        self.spec = spec

    def forward(self, x, positions):
        return reference.rope(x, positions, self.spec)


class Attention(nn.Module):
    """Attention of q: [T, H, D] with k, v: [T, Hkv, D] over the paged KV cache.

    The tracer wires in the step's paged context (KV cache of this layer, query_start,
    seq_lens, block_tables, slot_mapping): a spec only says `self.attn(q, k, v)`.
    Layers are numbered in the order the spec calls them.
    """

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec
        self.sinks = meta_parameter(spec.num_heads) if spec.sinks else None

    def forward(self, q, k, v):
        raise RuntimeError("Attention needs the paged step context: trace the spec with kiln.frontend.trace")


class LinearAttention(nn.Module):
    """A recurrent layer (ir/linear_rules.py): q, k [T, Hk, Dk], v [T, Hv, Dv], g [T, Hv] (the log
    decay) and, for rules that use it, beta [T, Hv] -> [T, Hv, Dv]. The tracer wires in the
    layer's state in the state pool and the step's query_start, seq_lens and state_indices; a spec
    says `self.attn(q, k, v, g, beta)` (positionally). Numbered with the `Attention` layers."""

    def __init__(self, spec: LinearAttentionSpec):
        super().__init__()
        self.spec = spec

    def forward(self, q, k, v, g, beta=None):
        raise RuntimeError("LinearAttention needs the state pool: trace the spec with kiln.frontend.trace")


class CausalConv1d(nn.Module):
    """A depthwise causal convolution of each sequence's tokens x [T, channels] -> [T, channels],
    continued from the sequence's last kernel_size - 1 inputs (kept in the state pool), then
    `activation` (None or "silu"). weight [channels, 1, kernel_size] as HF's depthwise nn.Conv1d
    stores it, bias [channels] when `bias`. Its state belongs to the layer whose attention or
    linear attention is called next."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, activation: str | None = None):
        super().__init__()
        self.activation = activation
        self.weight = meta_parameter(channels, 1, kernel_size)
        self.bias = meta_parameter(channels) if bias else None

    def forward(self, x):
        raise RuntimeError("CausalConv1d needs the state pool: trace the spec with kiln.frontend.trace")


class Experts(nn.Module):
    """The experts of a mixture: x [T, hidden] routed by `weights` [T, top_k] (any float dtype; applied
    in x's dtype) and expert `ids` [T, top_k] -> [T, out]. Each expert is a gated MLP: gate_up_proj
    [E, 2 * intermediate, hidden] (gate rows first), `activation` (ir/op_types.MOE_ACTIVATIONS:
    "silu", or GPT-OSS's "swiglu_clamped" with `alpha` and `limit`), down_proj [E, out, intermediate];
    biases [E, 2 * intermediate] and [E, out] when `bias`. The router is plain spec code."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, out: int | None = None,
                 activation: str = "silu", alpha: float | None = None, limit: float | None = None, bias: bool = False):
        super().__init__()
        out = hidden if out is None else out
        self.activation, self.alpha, self.limit = activation, alpha, limit
        self.gate_up_proj = meta_parameter(num_experts, 2 * intermediate, hidden)
        self.down_proj = meta_parameter(num_experts, out, intermediate)
        self.gate_up_proj_bias = meta_parameter(num_experts, 2 * intermediate) if bias else None
        self.down_proj_bias = meta_parameter(num_experts, out) if bias else None

    def forward(self, x, weights, ids):
        biases = (self.gate_up_proj_bias, self.down_proj_bias) if self.gate_up_proj_bias is not None else ()
        return reference.moe(x, weights, ids, self.gate_up_proj, self.down_proj, *biases, activation=self.activation,
                             alpha=self.alpha, limit=self.limit)


class LastTokens(nn.Module):
    """Selects the rows whose logits the step returns: x: [T, D] -> [B, D] (step input
    `logits_indices`, normally each sequence's last token)."""

    def forward(self, x):
        raise RuntimeError("LastTokens needs the step's logits_indices: trace the spec with kiln.frontend.trace")


LEAF_BLOCKS = (Linear, Embedding, RMSNorm, Rope, Attention, LinearAttention, CausalConv1d, Experts, LastTokens)
