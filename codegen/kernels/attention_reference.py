"""Naive torch references for the paged attention kernels.

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
from kiln.ir.specs import AttentionKind, AttentionSpec, BlockSparseLayout, KVLayout


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              query_start: torch.Tensor, seq_lens: torch.Tensor,
                              block_tables: torch.Tensor, *, scale: float | None = None,
                              window: int | None = None, softcap: float | None = None,
                              sinks: torch.Tensor | None = None, block_sparse: BlockSparseLayout | None = None,
                              exact: bool = False) -> torch.Tensor:
    """Causal (optionally sliding-window or block-sparse, soft-capped) GQA attention over a paged
    KV cache: the IR's reference semantics (`ir.reference.paged_attention`) for the kernels' arguments.

    q: [T, H, D]; sinks: [H] logits that join every softmax denominator. Runs in q's dtype (the
    same-dtype baseline), or with exact=True in fp64, returned as fp64 (the oracle). Returns [T, H, D].
    It reads every cached page of a sequence: pages that the mask hides must hold finite values.
    """
    kind = (AttentionKind.BLOCK_SPARSE if block_sparse is not None
            else AttentionKind.DENSE if window is None else AttentionKind.SLIDING_WINDOW)
    spec = AttentionSpec(kind, num_heads=q.shape[1], num_kv_heads=k_cache.shape[2], head_dim=q.shape[2], scale=scale,
                         window=window, softcap=softcap, sinks=sinks is not None, block_sparse=block_sparse,
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
