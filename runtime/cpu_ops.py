"""Torch implementations of kiln's composite ops for the `cpu` target's generated programs.

Unlike `ir.reference` (the oracle, written for clarity) these are written for speed on a CPU:
attention is batched over sequences, decode steps avoid per-sequence Python loops.
Shapes follow the step convention (ir/step.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [..., D] normalized over D in fp32 (as HF), scaled by weight [D] in x's dtype (no
    weight: the compiler folded it into the next linear)."""
    h = x.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


def linear_t(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] @ weight_t: [K, N] (a linear weight stored transposed) (+ bias [N]) -> [M, N]."""
    return torch.matmul(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def embedding_t(ids: torch.Tensor, table_t: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [T] of an embedding table stored transposed, table_t: [D, V] -> [T, D]."""
    return table_t.index_select(1, ids).t()


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] rotated (rotate-half layout) on its first 2*len(inv_freq) channels."""
    dim = 2 * inv_freq.shape[0]
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot = x[..., :dim]
    rotated = torch.cat([-rot[..., dim // 2 :], rot[..., : dim // 2]], dim=-1)
    out = rot * cos + rotated * sin
    return out if dim == x.shape[-1] else torch.cat([out, x[..., dim:]], dim=-1)


def write_cache(x: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores x: [T, Hkv, D] at slot_mapping[T] of cache [NB, bs, Hkv, D] (-1: skip)."""
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        x, slot_mapping = x[keep], slot_mapping[keep]
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping.long(), x)


def _contexts(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, max_len, Hkv, D]: each sequence's cached tokens through its block table (padded)."""
    bs = cache.shape[1]
    blocks = block_tables[:, : (max_len + bs - 1) // bs].long()
    return cache[blocks].flatten(1, 2)[:, :max_len]


def prefill_attention(q, k_cache, v_cache, query_start, seq_lens, block_tables, *, scale: float,
                      window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of q: [T, H, D] over each sequence's paged context -> [T, H, D], for any
    mix of prefill chunks and decodes (a loop over sequences). Math in fp32, output in q's dtype."""
    num_seqs, heads, kv_heads = seq_lens.shape[0], q.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    starts, lengths = query_start.tolist(), seq_lens.tolist()
    for b in range(num_seqs):
        s, e, length = starts[b], starts[b + 1], lengths[b]
        keys = _contexts(k_cache, block_tables[b : b + 1], length)[0].float()
        values = _contexts(v_cache, block_tables[b : b + 1], length)[0].float()
        q_pos = torch.arange(length - (e - s), length)
        mask = _mask(q_pos, length, window)
        qb = q[s:e].float().transpose(0, 1)  # [H, q, D]
        kb = keys.transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        vb = values.transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        if softcap is None:
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        else:
            ob = _softmax_attention(qb, kb, vb, mask, scale, softcap)
        out[s:e] = ob.transpose(0, 1).to(q.dtype)
    return out


def _mask(q_pos: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    k_pos = torch.arange(length)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def _softmax_attention(q, k, v, mask, scale, softcap):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def decode_attention(q, k_cache, v_cache, seq_lens, block_tables, *, scale: float,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [B, H, D], one query per sequence at position seq_lens[b] - 1, as one batched matmul
    over the sequences' gathered contexts -> [B, H, D]."""
    num_seqs, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    max_len = int(seq_lens.max())
    keys = _contexts(k_cache, block_tables, max_len).float()  # [B, L, Hkv, D]
    values = _contexts(v_cache, block_tables, max_len).float()
    qg = q.float().view(num_seqs, kv_heads, heads // kv_heads, dim)  # grouped query heads
    scores = torch.einsum("bkgd,blkd->bkgl", qg, keys) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    k_pos = torch.arange(max_len)[None, :]
    visible = k_pos < seq_lens[:, None]
    if window is not None:
        visible &= k_pos > (seq_lens[:, None] - 1 - window)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgl,blkd->bkgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(num_seqs, heads, dim).to(q.dtype)
