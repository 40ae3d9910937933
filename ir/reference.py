"""Reference semantics of the IR's composite ops in plain torch: the oracle for passes and kernels.

Written for clarity, not speed: attention loops over sequences. Math runs in fp32 and results
are cast back to the input dtype.
"""

from __future__ import annotations

import torch

from kiln.ir.specs import AttentionSpec, RopeSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [..., D], weight: [D] or None (folded into the next linear). Normalizes in fp32 (as HF),
    scales in x's dtype."""
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h if weight is None else weight * h


def rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """x: [T, H, D], positions: [T]. Rotate-half layout on the first spec.dim channels; cos and
    sin are scaled by spec.attention_factor (YaRN, LongRoPE), as transformers does."""
    angles = positions.float()[:, None] * spec.inv_freq()[None, :]  # [T, dim/2]
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]  # [T, 1, dim]
    factor = spec.attention_factor
    cos, sin = (emb.cos() * factor).to(x.dtype), (emb.sin() * factor).to(x.dtype)
    rot, rest = x[..., : spec.dim], x[..., spec.dim :]
    half = spec.dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def write_rows(x, cache, slot_mapping) -> torch.Tensor:
    """Stores x: [T, Hkv, D] into cache [NB, bs, Hkv, D] at slot_mapping[T] (-1: skip); returns cache."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = cache.shape[1]
    cache[slots // bs, slots % bs] = x[keep]
    return cache


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Stores k, v: [T, Hkv, D] into the caches [NB, bs, Hkv, D] at slot_mapping[T] (-1: skip)."""
    write_rows(k, k_cache, slot_mapping)
    write_rows(v, v_cache, slot_mapping)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first `length` cached tokens: [length, Hkv, D], through its block table."""
    bs = cache.shape[1]
    blocks = block_table[: (length + bs - 1) // bs].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """[q, k] bool: which keys each query sees (causal, sliding window, block-sparse layout)."""
    mask = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
    if spec.causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    if spec.window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - spec.window
    if spec.block_sparse is not None:
        layout = spec.block_sparse
        mask &= layout.sees(q_pos[:, None] // layout.block_size, k_pos[None, :] // layout.block_size)
    return mask


def paged_attention(q, k_cache, v_cache, query_start, seq_lens, block_tables, spec: AttentionSpec, sinks=None, *,
                    compute_dtype: torch.dtype | None = None):
    """Attention of q: [T, H, D] over each sequence's cached context (the new tokens' K/V must
    already be in the cache). Returns [T, H, D]: by default computed in fp32 and returned in q's
    dtype (the interpreter's semantics); with `compute_dtype`, computed and returned in that
    dtype (kernel tests: fp64 for the exact oracle, q's own dtype for a same-dtype baseline)."""
    compute = compute_dtype or torch.float32
    out = torch.empty(q.shape, dtype=compute_dtype or q.dtype, device=q.device)
    for b in range(len(seq_lens)):
        start, end, length = int(query_start[b]), int(query_start[b + 1]), int(seq_lens[b])
        keys = gather_context(k_cache, block_tables[b], length).to(compute).repeat_interleave(spec.group_size, dim=1)
        values = gather_context(v_cache, block_tables[b], length).to(compute).repeat_interleave(spec.group_size, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].to(compute), keys) * spec.effective_scale
        if spec.softcap is not None:
            scores = spec.softcap * torch.tanh(scores / spec.softcap)
        positions = torch.arange(length, device=q.device)
        scores = scores.masked_fill(~attention_mask(positions[length - (end - start):], positions, spec), float("-inf"))
        if sinks is not None:
            sink = sinks.to(compute)[:, None, None].expand(-1, end - start, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values).to(out.dtype)
    return out


def attention_node(node, args: list[torch.Tensor], bindings) -> torch.Tensor:
    """The `attention` op: writes k, v into the caches at slot_mapping, then attends."""
    q, k, v, k_cache, v_cache, query_start, seq_lens, block_tables, slot_mapping, *sinks = args
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    return paged_attention(q, k_cache, v_cache, query_start, seq_lens, block_tables, node.attrs["spec"], *sinks)


def attention_decode_node(node, args: list[torch.Tensor], bindings) -> torch.Tensor:
    """The `attention_decode` op: one query per sequence."""
    q, k_cache, v_cache, seq_lens, block_tables, *sinks = args
    one_query_each = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    return paged_attention(q, k_cache, v_cache, one_query_each, seq_lens, block_tables, node.attrs["spec"], *sinks)


def expert_activation(gate_up: torch.Tensor, activation: str, alpha: float | None, limit: float | None) -> torch.Tensor:
    """The gated activation of an expert over its packed [.., 2I] gate/up output (ir/op_types.MOE_ACTIVATIONS)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    assert alpha is not None and limit is not None, "swiglu_clamped needs alpha and limit"
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


def moe(x, weights, ids, w_gate_up, w_down, b_gate_up=None, b_down=None, *, activation: str = "silu",
        alpha: float | None = None, limit: float | None = None) -> torch.Tensor:
    """A mixture of experts, token by token: x [T, K], routing weights and expert ids [T, top_k], expert
    weights w_gate_up [E, 2I, K] (gate rows first), w_down [E, N, I], biases [E, 2I], [E, N] or None.
    out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]), each expert's product in x's dtype (as HF)."""
    out = torch.zeros(x.shape[0], w_down.shape[1], dtype=x.dtype)
    for t in range(x.shape[0]):
        for weight, e in zip(weights[t].to(x.dtype), ids[t].long().tolist()):
            h = x[t] @ w_gate_up[e].t() + (b_gate_up[e] if b_gate_up is not None else 0)
            y = expert_activation(h, activation, alpha, limit) @ w_down[e].t()
            out[t] += weight * (y + (b_down[e] if b_down is not None else 0))
    return out


def moe_node(node, args: list[torch.Tensor], bindings) -> torch.Tensor:
    """The `moe` op (see `moe`)."""
    return moe(*args, activation=node.attrs["activation"], alpha=node.attrs["alpha"], limit=node.attrs["limit"])


def all_reduce(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's x (same shape) -> the sum over ranks, on every rank: summed in fp32 and cast
    back (a real all-reduce may sum in another order, or in x's dtype)."""
    total = torch.stack([v.float() for v in values]).sum(0).to(values[0].dtype)
    return [total.clone() for _ in values]


def all_gather(values: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """Each rank's x -> the ranks' x concatenated along `dim` in rank order, on every rank."""
    whole = torch.cat(values, dim=dim)
    return [whole.clone() for _ in values]
