"""Naive torch references for the paged KV write and paged attention kernels.

These are the oracles the Triton kernels are tested against: one loop over sequences, dense
per-sequence tensors, no tiling, no cleverness. They follow the step calling convention
(query_start[B+1], seq_lens[B], block_tables[B, M], slot_mapping[T]; caches
[num_blocks, page_size, Hkv, D]). `make_paged_step` builds random steps in that convention
(shuffled block ids, padded block-table tails) for tests and benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kiln.ir import reference
from kiln.ir.specs import AttentionKind, AttentionSpec, KVLayout


def kv_write_reference(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns copies of the caches with token t's k/v stored at slot slot_mapping[t] (skip -1).

    k, v: [T, Hkv, D]; slot_mapping: [T] int32; k_cache, v_cache: [num_blocks, page_size, Hkv, D].
    """
    k_out, v_out = k_cache.clone(), v_cache.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_out.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_out.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)
    return k_out, v_out


def rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *,
                   exact: bool = False) -> torch.Tensor:
    """Rotary embedding, "rotate_half" layout, angle = float(position) * inv_freq in fp32.

    x: [T, H, D]; positions: [T]; inv_freq: [D/2] fp32. Rotates in fp32 and returns x's dtype
    (the same-dtype baseline), or with exact=True rotates in fp64 and returns fp64 (the oracle).
    """
    compute = torch.float64 if exact else torch.float32
    angle = (positions.float()[:, None] * inv_freq.float()[None, :]).to(compute)  # [T, D/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x1, x2 = x.to(compute).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out if exact else out.to(x.dtype)


def rope_kv_write_reference(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                            slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            num_heads: int, num_kv_heads: int, *, exact: bool = False):
    """Splits the packed projection, ropes q and k, writes k/v into copies of the caches.

    qkv: [T, (H + 2*Hkv) * D], heads in the order q, k, v. Returns (q_out [T, H, D], k_cache',
    v_cache'), in fp64 when exact (see `rope_reference`).
    """
    head_dim = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    heads = qkv.view(qkv.shape[0], num_heads + 2 * num_kv_heads, head_dim)
    q, k, v = heads.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    if exact:
        k_cache, v_cache = k_cache.double(), v_cache.double()
    q_out = rope_reference(q, positions, inv_freq, exact=exact)
    k_cache, v_cache = kv_write_reference(rope_reference(k, positions, inv_freq, exact=exact), v, slot_mapping,
                                          k_cache, v_cache)
    return q_out, k_cache, v_cache


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              query_start: torch.Tensor, seq_lens: torch.Tensor,
                              block_tables: torch.Tensor, *, scale: float | None = None,
                              window: int | None = None, softcap: float | None = None,
                              sinks: torch.Tensor | None = None, exact: bool = False) -> torch.Tensor:
    """Causal (optionally sliding-window, soft-capped) GQA attention over a paged KV cache: the
    IR's reference semantics (`ir.reference.paged_attention`) for the kernels' arguments.

    q: [T, H, D]; sinks: [H] logits that join every softmax denominator. Runs in q's dtype (the
    same-dtype baseline), or with exact=True in fp64, returned as fp64 (the oracle). Returns [T, H, D].
    """
    kind = AttentionKind.DENSE if window is None else AttentionKind.SLIDING_WINDOW
    spec = AttentionSpec(kind, num_heads=q.shape[1], num_kv_heads=k_cache.shape[2], head_dim=q.shape[2], scale=scale,
                         window=window, softcap=softcap, sinks=sinks is not None,
                         kv_layout=KVLayout(block_size=k_cache.shape[1]))
    return reference.paged_attention(q, k_cache, v_cache, query_start, seq_lens, block_tables, spec, sinks,
                                     compute_dtype=torch.float64 if exact else q.dtype)


@dataclass(frozen=True)
class PagedStep:
    """One step's attention metadata in the step convention (all int32, on one device)."""

    query_start: torch.Tensor   # [B+1]
    seq_lens: torch.Tensor      # [B]
    block_tables: torch.Tensor  # [B, M]; entries past a sequence's last page are padding
    slot_mapping: torch.Tensor  # [T]; the new tokens' slots, -1 where `skip_write` asked
    positions: torch.Tensor     # [T]


def make_paged_step(q_lens: list[int], seq_lens: list[int], page_size: int, num_blocks: int,
                    generator: torch.Generator, *, pad_pages: int = 2,
                    skip_write: list[int] = (), device: str | torch.device = "cpu") -> PagedStep:
    """Random paged layout: each sequence gets distinct, shuffled physical blocks.

    q_lens[b] <= seq_lens[b] (chunked prefill when smaller, decode when 1). Block-table tails
    are filled with `pad_pages` columns of -7 garbage, which a kernel must never read.
    `skip_write` lists token indices whose slot is -1 (padding tokens).
    """
    pages_per_seq = [math.ceil(n / page_size) for n in seq_lens]
    if sum(pages_per_seq) > num_blocks:
        raise ValueError(f"{sum(pages_per_seq)} pages needed, only {num_blocks} blocks")
    physical = torch.randperm(num_blocks, generator=generator)
    width = max(pages_per_seq) + pad_pages
    block_tables = torch.full((len(seq_lens), width), -7, dtype=torch.int32)
    slots, positions, used = [], [], 0
    for b, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        assert 1 <= q_len <= seq_len, (q_len, seq_len)
        blocks = physical[used:used + pages_per_seq[b]]
        used += pages_per_seq[b]
        block_tables[b, :len(blocks)] = blocks.int()
        pos = torch.arange(seq_len - q_len, seq_len)
        positions.append(pos)
        slots.append(blocks[pos // page_size] * page_size + pos % page_size)
    slot_mapping = torch.cat(slots).int()
    slot_mapping[list(skip_write)] = -1
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    tensors = (query_start, torch.tensor(seq_lens, dtype=torch.int32), block_tables, slot_mapping,
               torch.cat(positions).int())
    return PagedStep(*(t.to(device) for t in tensors))
