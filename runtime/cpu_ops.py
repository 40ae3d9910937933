"""Torch implementations of kiln's composite ops for the `cpu` target's generated programs.

Unlike `ir.reference` (the oracle, written for clarity) these are written for speed on a CPU:
fp32 linears run on oneDNN, attention through torch's CPU flash-attention kernel, decodes
batched (in groups of similar context length) rather than looped over, values that only depend
on the step inputs computed once per step. Sliding-window and block-sparse attention gather only
the KV pages that some query sees: the runtime may point the block-table entries of the others
(released blocks) at any page, even another sequence's.
Shapes follow the step convention (ir/step.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.ir.specs import BlockSparseLayout

_ONEDNN = torch.backends.mkldnn.is_available()
_DECODE_GROUP = 8  # sequences per decode_attention group


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [..., D] normalized over D in fp32 (as HF), scaled by weight [D] in x's dtype (no
    weight: the compiler folded it into the next linear)."""
    normed = F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
    return normed if weight is None else weight * normed


def pack_linear_weight(weight_t: torch.Tensor) -> torch.Tensor:
    """A linear weight stored transposed, weight_t: [K, N], packed into oneDNN's blocked layout
    for `linear_t` (done once, when the executor loads the weights); non-fp32 weights stay as they are."""
    if weight_t.dtype != torch.float32 or not _ONEDNN:
        return weight_t
    return torch.ops.mkldnn._reorder_linear_weight(weight_t.t())


def linear_t(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] times a linear weight (+ bias [N]) -> [M, N]. weight_t is stored transposed,
    [K, N], or packed by `pack_linear_weight`. fp32 runs on oneDNN, whose AVX-512 kernels beat
    MKL's (AMD CPUs get its AVX2 path) by ~1.5x at M = 1 and ~2x at M >= 4 on the dev machine."""
    if x.dtype == torch.float32 and _ONEDNN:
        weight = weight_t if weight_t.is_mkldnn else weight_t.t()
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.matmul(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def embedding_t(ids: torch.Tensor, table_t: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [T] of an embedding table stored transposed, table_t: [D, V] -> [T, D]."""
    return table_t.index_select(1, ids).t()


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
               factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, F] of the angles positions[T] * inv_freq[F], times the rope's attention
    factor, in `dtype`: computed once per step and shared by every `rope` of that step."""
    angles = (positions.float()[:, None] * inv_freq)[:, None, :]
    if factor == 1.0:
        return angles.cos().to(dtype), angles.sin().to(dtype)
    return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


def rope(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: [T, H, D] rotated (rotate-half layout) on its first 2F channels by `rope_table`'s
    cos, sin [T, 1, F]."""
    cos, sin = table
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def cache_slots(slot_mapping: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For `write_cache`, once per step: which of the T tokens to store (None: all) and their
    slots (int64) in a cache viewed as [NB * bs, Hkv, D]; slot -1 means skip."""
    keep = slot_mapping >= 0
    if bool(keep.all()):
        return None, slot_mapping.long()
    return keep, slot_mapping[keep].long()


def write_cache(x: torch.Tensor, cache: torch.Tensor, slots: tuple[torch.Tensor | None, torch.Tensor]) -> None:
    """Stores x: [T, Hkv, D] in cache [NB, bs, Hkv, D] at the `cache_slots` of the step."""
    keep, index = slots
    cache.view(-1, *cache.shape[2:]).index_copy_(0, index, x if keep is None else x[keep])


@dataclass(frozen=True)
class _Variant:
    """What an attention call varies in besides its tensors: `layout` is the block-sparse
    layout (None: dense), `sinks` the per-head sink logits [H] in fp32 (None: no sinks)."""

    scale: float
    window: int | None
    softcap: float | None
    layout: BlockSparseLayout | None
    sinks: torch.Tensor | None

    @property
    def bounded(self) -> bool:
        """Whether a query sees less than its whole causal context (so not every KV page is read)."""
        return self.window is not None or self.layout is not None

    def sees(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """bool, q_pos and k_pos broadcast: whether the query at q_pos sees the key at k_pos."""
        visible = k_pos <= q_pos
        if self.window is not None:
            visible &= k_pos > q_pos - self.window
        if self.layout is not None:
            size = self.layout.block_size
            visible &= self.layout.sees(q_pos // size, k_pos // size)
        return visible


def _variant(scale, window, softcap, layout, sinks) -> _Variant:
    return _Variant(scale, window, softcap, None if layout is None else BlockSparseLayout(*layout),
                    None if sinks is None else sinks.float())


def _gather(cache: torch.Tensor, pages: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """[R, n * bs (or the first `length`), Hkv, D]: the cache pages [R, n] of each row, in order.
    index_select: ~3x faster than advanced indexing for this gather."""
    gathered = cache.index_select(0, pages.flatten()).view(pages.shape[0], -1, *cache.shape[2:])
    return gathered if length is None else gathered[:, :length]


def _visible_pages(q_pos: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                   variant: _Variant) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of queries q_pos: [R, q] (a row: one decode, or one prefill chunk) whose tables
    are block_tables: [R, M], the KV pages some query of the row sees: pages [R, n] (physical
    ids, in position order) and visible [R, q, n * bs] (which query sees which of their keys).
    Pages no query sees are never read: their table entries may point anywhere. A row with
    fewer than n pages is padded with its first page, which no query sees there."""
    rows, queries = q_pos.shape
    num_pages = int(q_pos.max()) // block_size + 1
    k_pos = torch.arange(num_pages * block_size)
    visible = variant.sees(q_pos[..., None], k_pos).view(rows, queries, num_pages, block_size)
    seen = visible.any(3).any(1)  # [R, P]
    counts = seen.sum(1)
    order = torch.sort((~seen).to(torch.uint8), dim=1, stable=True).indices[:, : int(counts.max())]  # seen first
    real = torch.arange(order.shape[1]) < counts[:, None]  # [R, n]
    order = torch.where(real, order, order[:, :1])
    pages = block_tables.gather(1, order)
    visible = visible.gather(2, order[:, None, :, None].expand(rows, queries, -1, block_size))
    return pages, (visible & real[:, None, :, None]).flatten(2)


def prefill_attention(q, k_cache, v_cache, query_start, seq_lens, block_tables, *, scale: float,
                      window: int | None = None, softcap: float | None = None,
                      layout: tuple[int, int, int] | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q: [T, H, D] over each sequence's paged context -> [T, H, D], for any
    mix of prefill chunks and decodes: the leading single-token sequences (the decodes, which
    the scheduler puts first) in one `decode_attention`, then a loop over the prompt chunks.
    `layout`: a block-sparse layout (block_size, local_blocks, vertical_stride), None for dense;
    `sinks`: [H] per-head logits that join each softmax's denominator. With a window or a layout
    a chunk reads only the KV pages some of its queries see (their table entries may point anywhere)."""
    variant = _variant(scale, window, softcap, layout, sinks)
    starts, lengths = query_start.tolist(), seq_lens.tolist()
    decodes = next((b for b in range(len(lengths)) if starts[b + 1] - starts[b] != 1), len(lengths))
    out = torch.empty_like(q)
    if decodes:
        out[:decodes] = _decode(q[:decodes], k_cache, v_cache, seq_lens[:decodes], block_tables[:decodes], variant)
    heads_sinks = None if variant.sinks is None else variant.sinks[:, None]  # [H, 1]: per head, every query
    for b in range(decodes, len(lengths)):
        s, e, length = starts[b], starts[b + 1], lengths[b]
        q_pos = torch.arange(length - (e - s), length)
        if variant.bounded:
            pages, visible = _visible_pages(q_pos[None], block_tables[b : b + 1], k_cache.shape[1], variant)
            keys, values = _gather(k_cache, pages), _gather(v_cache, pages)
        else:
            pages = block_tables[b : b + 1, : -(-length // k_cache.shape[1])]
            keys, values = _gather(k_cache, pages, length), _gather(v_cache, pages, length)
            visible = variant.sees(q_pos[:, None], torch.arange(length))[None]
        out[s:e] = _attend(q[None, s:e].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                           visible[:, None], variant, heads_sinks)[0].transpose(0, 1)
    return out


def decode_attention(q, k_cache, v_cache, seq_lens, block_tables, *, scale: float,
                     window: int | None = None, softcap: float | None = None,
                     layout: tuple[int, int, int] | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, D], one query per sequence at position seq_lens[b] - 1 -> [B, H, D]; `layout`
    and `sinks` as for `prefill_attention`. Sequences attend in groups of up to 8 of similar
    length (sorted), each group over its contexts gathered and padded to its own longest: at
    batch 32 with lengths 50..330 that reads ~30% fewer padded keys than one group and took ~30%
    less time. With a window or a layout only the KV pages the query sees are gathered."""
    return _decode(q, k_cache, v_cache, seq_lens, block_tables, _variant(scale, window, softcap, layout, sinks))


def _decode(q, k_cache, v_cache, seq_lens, block_tables, variant: _Variant) -> torch.Tensor:
    if len(seq_lens) <= _DECODE_GROUP:
        return _decode_group(q, k_cache, v_cache, seq_lens, block_tables, variant)
    out = torch.empty_like(q)
    for group in torch.argsort(seq_lens).split(_DECODE_GROUP):
        out[group] = _decode_group(q[group], k_cache, v_cache, seq_lens[group], block_tables[group], variant)
    return out


def _decode_group(q, k_cache, v_cache, seq_lens, block_tables, variant: _Variant) -> torch.Tensor:
    """_decode in one batched call over the sequences' gathered (padded) contexts. The H / Hkv
    query heads that share a kv head attend as that head's queries, so each key is read once."""
    num_seqs, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if variant.bounded:
        pages, visible = _visible_pages(seq_lens[:, None].long() - 1, block_tables, block_size, variant)
        keys, values = _gather(k_cache, pages), _gather(v_cache, pages)
        visible = visible[:, None]  # [B, 1, 1, n * bs]
    else:
        length = int(seq_lens.max())
        pages = block_tables[:, : -(-length // block_size)]
        keys, values = _gather(k_cache, pages, length), _gather(v_cache, pages, length)
        visible = None  # one sequence sees its whole (unpadded) context
        if num_seqs > 1:
            visible = (torch.arange(length) < seq_lens[:, None])[:, None, None]
    grouped = q.reshape(num_seqs, kv_heads, heads // kv_heads, dim)
    group_sinks = None if variant.sinks is None else variant.sinks.view(kv_heads, -1)  # [Hkv, H / Hkv]
    out = _attend(grouped, keys.transpose(1, 2), values.transpose(1, 2), visible, variant, group_sinks)
    return out.reshape(num_seqs, heads, dim)


def _attend(q, k, v, visible, variant: _Variant, sinks) -> torch.Tensor:
    """q: [B, H, q, D] attending to k, v: [B, Hkv, L, D] (H / Hkv query heads per kv head) where
    visible (bool, broadcastable to [B, H, q, L]; None: everywhere; every query sees some key)
    -> [B, H, q, D]. sinks: None, or logits broadcastable to [B, H, q] that join each softmax's
    denominator: out * sigmoid(logsumexp(scores) - sink). Math in fp32, output in q's dtype.
    Without softcap: torch's CPU flash kernel (SDPA's on CPUs), called for its logsumexp too."""
    qf, k, v = q.float(), k.float(), v.float()
    if variant.softcap is None:
        mask = None if visible is None else torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qf, k, v, attn_mask=mask,
                                                                              scale=variant.scale)
    else:
        group = q.shape[1] // k.shape[1]
        scores = torch.matmul(qf, k.repeat_interleave(group, 1).transpose(-1, -2)) * variant.scale
        scores = variant.softcap * torch.tanh(scores / variant.softcap)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.softmax(scores, dim=-1), v.repeat_interleave(group, 1))
    if sinks is not None:
        out = out * torch.sigmoid(lse - sinks)[..., None]
    return out.to(q.dtype)
