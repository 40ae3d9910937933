"""Torch implementations of kiln's composite ops for the `cpu` target's generated programs.

Unlike `ir.reference` (the oracle, written for clarity) these are written for speed on a CPU:
attention through torch's CPU flash-attention kernel, decodes
batched (in groups of similar context length) rather than looped over, values that only depend
on the step inputs computed once per step. Sliding-window and block-sparse attention gather only
the KV pages that some query sees: the runtime may point the block-table entries of the others
(released blocks) at any page, even another sequence's. Long contexts are attended in blocks
of keys whose results merge by logsumexp: an attention call's temporaries are bounded by its
queries (the step's token budget), not by the context length.
Once C kernels are installed (runtime/cpu_step_kernels.py) rms_norm, silu_mul, rope, write_cache,
rope_write(_qkv), decode attention, add, gather_rows and linears of few rows run on them for the cases
they support (fp32, contiguous), the torch code below otherwise.
Shapes follow the step convention (ir/step.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.contract import BlockSparseLayout
from kiln.runtime import cpu_step_kernels
from kiln.runtime.cpu_linear_attention import causal_conv1d, linear_attention  # noqa: F401  (called as cpu_ops.*)
from kiln.runtime.cpu_moe import moe  # noqa: F401  (the step programs call it as cpu_ops.moe)

_DECODE_GROUP = 8  # sequences per decode_attention group


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [..., D] normalized over D in fp32 (as HF), scaled by weight [D] in x's dtype (no
    weight: the compiler folded it into the next linear)."""
    kernels = cpu_step_kernels.installed
    if kernels is not None and (out := kernels.rms_norm(x, weight, eps)) is not None:
        return out
    normed = F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
    return normed if weight is None else weight * normed


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b (torch's broadcasting and type promotion; same-shape fp32 on the C kernels)."""
    kernels = cpu_step_kernels.installed
    if kernels is not None and (out := kernels.add(a, b)) is not None:
        return out
    return a + b


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows]: the rows `rows` [n] (any integer dtype) of x [R, ...]."""
    kernels = cpu_step_kernels.installed
    if kernels is not None and (out := kernels.gather_rows(x, rows)) is not None:
        return out
    return x[rows.long()]


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2I], a gated MLP's gate and up projections side by side -> silu(gate) * up: [..., I]."""
    kernels = cpu_step_kernels.installed
    if kernels is not None and (out := kernels.silu_mul(x)) is not None:
        return out
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def linear_t(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] times a linear weight stored transposed, weight_t: [K, N] (+ bias [N]) -> [M, N]. fp32
    below cpu_step_kernels.LINEAR_ROWS rows runs on the C kernel (a decode step's linears), larger M
    on torch's GEMM, which reads the [K, N] layout as it is: no second, packed copy of the weights."""
    kernels = cpu_step_kernels.installed
    if kernels is not None and (y := kernels.linear(x, weight_t, bias)) is not None:
        return y
    return torch.matmul(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def embedding_t(ids: torch.Tensor, table_t: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [T] of an embedding table stored transposed, table_t: [D, V] -> [T, D]."""
    return gather_rows(table_t.t(), ids)


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
               factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, F] of the angles positions[T] * inv_freq[F], times the rope's attention
    factor, in `dtype`: computed once per step and shared by every `rope` of that step."""
    kernels = cpu_step_kernels.installed
    if kernels is not None and dtype == torch.float32 and (
            table := kernels.rope_table(positions, inv_freq, factor)) is not None:
        return table
    angles = (positions.float()[:, None] * inv_freq)[:, None, :]
    if factor == 1.0:
        return angles.cos().to(dtype), angles.sin().to(dtype)
    return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


def rope(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: [T, H, D] rotated (rotate-half layout) on its first 2F channels by `rope_table`'s
    cos, sin [T, 1, F]."""
    cos, sin = table
    kernels = cpu_step_kernels.installed
    if kernels is not None and (out := kernels.rope(x, cos, sin)) is not None:
        return out
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def cache_slots(slot_mapping: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For `write_cache`, once per step: which of the T tokens to store (None: all) and their
    slots (int64) in a cache viewed as [NB * bs, Hkv, D]; slot -1 means skip."""
    kernels = cpu_step_kernels.installed
    if kernels is not None and (index := kernels.slots(slot_mapping)) is not None:
        return None, index
    keep = slot_mapping >= 0
    if bool(keep.all()):
        return None, slot_mapping.long()
    return keep, slot_mapping[keep].long()


def write_cache(x: torch.Tensor, cache: torch.Tensor, slots: tuple[torch.Tensor | None, torch.Tensor]) -> None:
    """Stores x: [T, Hkv, D] in cache [NB, bs, Hkv, D] at the `cache_slots` of the step."""
    keep, index = slots
    kernels = cpu_step_kernels.installed
    if keep is None and kernels is not None and kernels.write_cache(x, cache, index):
        return
    cache.view(-1, *cache.shape[2:]).index_copy_(0, index, x if keep is None else x[keep])


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor],
               k_cache: torch.Tensor, v_cache: torch.Tensor, slots: tuple[torch.Tensor | None, torch.Tensor]) -> torch.Tensor:
    """q: [T, H, D], k, v: [T, Hkv, D] -> rope(q, table); stores rope(k, table) in k_cache and v in
    v_cache at the `cache_slots` of the step: a layer's rope, rope, write_cache, write_cache in one call."""
    keep, index = slots
    kernels = cpu_step_kernels.installed
    if keep is None and kernels is not None and (out := kernels.rope_write(q, k, v, *table, k_cache, v_cache, index)) is not None:
        return out
    write_cache(rope(k, table), k_cache, slots)
    write_cache(v, v_cache, slots)
    return rope(q, table)


def rope_write_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, table: tuple[torch.Tensor, torch.Tensor],
                   k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slots: tuple[torch.Tensor | None, torch.Tensor]) -> torch.Tensor:
    """`rope_write` of a fused projection's output qkv: [T, (H + 2 Hkv) D] (q, k, v side by side)
    -> rope(q): [T, H, D], without the views of q, k and v (on SmolLM2-135M their narrows and
    reshapes were ~0.5 ms of a 3 ms batch-1 decode step outside the linears)."""
    keep, index = slots
    kernels = cpu_step_kernels.installed
    if keep is None and kernels is not None and (out := kernels.rope_write_qkv(
            qkv, heads, kv_heads, head_dim, *table, k_cache, v_cache, index)) is not None:
        return out
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    tokens = qkv.shape[0]
    return rope_write(q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim),
                      v.reshape(tokens, kv_heads, head_dim), table, k_cache, v_cache, slots)


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


# About the most bytes a key block's temporaries take (its gathered keys and values, its mask or
# scores): each stays under the 32 MiB above which glibc maps fresh pages for every allocation
# (executor.keep_freed_memory), whose page faults cost more than the attention itself.
_BLOCK_BYTES = 16 << 20
# Keys a softcap block aims at: its queries are tiled so that their scores over this many keys fit
# _BLOCK_BYTES (with all of a 2048-token chunk's queries a block would hold ~200 keys, and its
# logsumexp merge would cost about as much as its matmuls).
_SOFTCAP_KEYS = 1024


def _keys_per_block(bytes_per_key: int, block_size: int) -> int:
    """How many keys one block holds when its temporaries take `bytes_per_key` a key: whole pages
    of `block_size` keys, at least one."""
    return max(1, _BLOCK_BYTES // (bytes_per_key * block_size)) * block_size


def _gather(cache: torch.Tensor, pages: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """[R, n * bs (or the first `length`), Hkv, D]: the cache pages [R, n] of each row, in order.
    index_select: ~3x faster than advanced indexing for this gather."""
    gathered = cache.index_select(0, pages.flatten()).view(pages.shape[0], -1, *cache.shape[2:])
    return gathered if length is None else gathered[:, :length]


def _gather_keys(cache: torch.Tensor, table: torch.Tensor, keys: range) -> torch.Tensor:
    """[1, len(keys), Hkv, D]: the cached keys (or values) at positions `keys` of the sequence whose
    pages are table: [M]."""
    block_size = cache.shape[1]
    first = keys.start // block_size
    offset = keys.start - first * block_size
    return _gather(cache, table[None, first : -(-keys.stop // block_size)])[:, offset : offset + len(keys)]


def _visible_pages(q_pos: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                   variant: _Variant) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of queries q_pos: [R, q] (a row: one decode) whose tables
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
    the scheduler puts first) in one `decode_attention`, then a loop over the prompt chunks, each
    over its context in key blocks (`_prefill_chunk`): temporaries bounded by the chunk, not the context.
    `layout`: a block-sparse layout (block_size, local_blocks, vertical_stride), None for dense;
    `sinks`: [H] per-head logits that join each softmax's denominator. With a window or a layout
    a chunk reads only the KV pages some of its queries see (their table entries may point anywhere)."""
    variant = _variant(scale, window, softcap, layout, sinks)
    starts, lengths = query_start.tolist(), seq_lens.tolist()
    decodes = next((b for b in range(len(lengths)) if starts[b + 1] - starts[b] != 1), len(lengths))
    out = torch.empty_like(q)
    if decodes:
        out[:decodes] = decode_attention(q[:decodes], k_cache, v_cache, seq_lens[:decodes], block_tables[:decodes],
                                         scale=scale, window=window, softcap=softcap, layout=layout, sinks=sinks)
    for b in range(decodes, len(lengths)):
        s, e = starts[b], starts[b + 1]
        chunk = _prefill_chunk(q[None, s:e].transpose(1, 2), k_cache, v_cache, block_tables[b], lengths[b], variant)
        out[s:e] = chunk[0].transpose(0, 1)
    return out


def _prefill_chunk(q, k_cache, v_cache, table, length: int, variant: _Variant) -> torch.Tensor:
    """q: [1, H, n, D], one sequence's queries at positions length - n .. length - 1, attending to
    its context in the pages table: [M] -> [1, H, n, D], in q's dtype. The context is attended in
    key blocks (`_chunk_blocks`) whose results merge by logsumexp; with softcap, whose scores are
    materialised, by tiles of queries too, so that a block's scores stay small with ~1k keys."""
    heads, n = q.shape[1], q.shape[2]
    rows = n if variant.softcap is None else max(1, _BLOCK_BYTES // (4 * heads * _SOFTCAP_KEYS))
    heads_sinks = None if variant.sinks is None else variant.sinks[:, None]  # [H, 1]: per head, every query
    out = torch.empty_like(q)
    for r0 in range(0, n, rows):
        tile = q[:, :, r0 : r0 + rows].float()
        tile_out, lse = _merged(_chunk_blocks(tile, k_cache, v_cache, table, length - n + r0 + tile.shape[2], variant))
        out[:, :, r0 : r0 + rows] = _with_sinks(tile_out, lse, heads_sinks)
    return out


def _chunk_blocks(q, k_cache, v_cache, table, length: int, variant: _Variant):
    """`_attend`'s (out, lse) for each key block of queries q: [1, H, n, D] in fp32 at positions
    length - n .. length - 1 (see `_prefill_chunk`). Dense attention without softcap needs no mask:
    the keys before the queries, which every query sees, then their own keys, a causal square.
    Otherwise the keys are scanned in ranges of the block size (a sliding window from the first key
    some query sees), the pages no query sees dropped, and the rest attended in blocks of at least
    that size (under twice it), each with the mask of what each query sees."""
    heads, n, dim = q.shape[1:]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    start = length - n
    if not variant.bounded and variant.softcap is None:
        step = _keys_per_block(8 * kv_heads * dim, block_size)  # fp32 keys and values
        for keys in [*(range(k0, min(k0 + step, start)) for k0 in range(0, start, step)), range(start, length)]:
            yield _attend(q, _gather_keys(k_cache, table, keys).transpose(1, 2),
                          _gather_keys(v_cache, table, keys).transpose(1, 2), None, variant, causal=keys.start == start)
        return
    score_bytes = 0 if variant.softcap is None else 4 * heads * (n + 2 * dim)  # scores; keys, values per query head
    step = _keys_per_block(max(8 * kv_heads * dim, 5 * n, score_bytes), block_size)  # 5 n: the bool and float masks
    first = 0 if variant.window is None else max(0, start - variant.window + 1) // block_size * block_size
    q_pos = torch.arange(start, length)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # seen pages [m] and what sees them [n, m, bs]
    for k0 in range(first, length, step):
        pages = table[k0 // block_size : -(-min(k0 + step, length) // block_size)]
        visible = variant.sees(q_pos[:, None], torch.arange(k0, k0 + len(pages) * block_size)).view(n, -1, block_size)
        seen = visible.any(2).any(0)
        pending.append((pages[seen], visible[:, seen]))
        if sum(len(p) for p, _ in pending) * block_size < step and k0 + step < length:
            continue
        pages, visible = torch.cat([p for p, _ in pending]), torch.cat([v for _, v in pending], dim=1)
        pending = []
        if len(pages):
            yield _attend(q, _gather(k_cache, pages[None]).transpose(1, 2), _gather(v_cache, pages[None]).transpose(1, 2),
                          visible.flatten(1), variant)


def decode_attention(q, k_cache, v_cache, seq_lens, block_tables, *, scale: float,
                     window: int | None = None, softcap: float | None = None,
                     layout: tuple[int, int, int] | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, D], one query per sequence at position seq_lens[b] - 1 -> [B, H, D]; `layout`
    and `sinks` as for `prefill_attention`. Sequences attend in groups of up to 8 of similar
    length (sorted), each group over its contexts gathered and padded to its own longest: at
    batch 32 with lengths 50..330 that reads ~30% fewer padded keys than one group and took ~30%
    less time. With a window or a layout only the KV pages the query sees are gathered. Long
    contexts go in key blocks (`_decode_group`). With kernels installed: one C call (online
    softmax over each sequence's visible keys, in place of gathers and SDPA)."""
    kernels = cpu_step_kernels.installed
    if kernels is not None and (out := kernels.decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale,
                                                                window, softcap, layout, sinks)) is not None:
        return out
    return _decode(q, k_cache, v_cache, seq_lens, block_tables, _variant(scale, window, softcap, layout, sinks))


def _decode(q, k_cache, v_cache, seq_lens, block_tables, variant: _Variant) -> torch.Tensor:
    if len(seq_lens) <= _DECODE_GROUP:
        return _decode_group(q, k_cache, v_cache, seq_lens, block_tables, variant)
    out = torch.empty_like(q)
    for group in torch.argsort(seq_lens).split(_DECODE_GROUP):
        out[group] = _decode_group(q[group], k_cache, v_cache, seq_lens[group], block_tables[group], variant)
    return out


def _decode_group(q, k_cache, v_cache, seq_lens, block_tables, variant: _Variant) -> torch.Tensor:
    """_decode batched over the sequences' gathered (padded) contexts, in key blocks merged by
    logsumexp, whose gathers stay under _BLOCK_BYTES (at batch 1 a block holds ~10k keys of a
    model with 3 kv heads of 64): one gather of 8 contexts of 8k tokens (48 MiB) took twice as long
    (a layer: 134 ms, in blocks 70 ms, on one core of the dev machine). The H / Hkv query heads
    that share a kv head attend as that head's queries, so each key is read once."""
    num_seqs, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if variant.bounded:
        pages, visible = _visible_pages(seq_lens[:, None].long() - 1, block_tables, block_size, variant)
        visible, length = visible[:, None], pages.shape[1] * block_size  # visible: [B, 1, 1, n * bs]
    else:
        length = int(seq_lens.max())
        pages = block_tables[:, : -(-length // block_size)]
        visible = None  # one sequence sees its whole (unpadded) context
        if num_seqs > 1:
            visible = (torch.arange(length) < seq_lens[:, None])[:, None, None]
    grouped = q.reshape(num_seqs, kv_heads, heads // kv_heads, dim).float()
    step = _keys_per_block(8 * num_seqs * kv_heads * dim, block_size)  # fp32 keys and values
    blocks = ((pages[:, k0 // block_size : (k0 + step) // block_size], min(step, length - k0),
               None if visible is None else visible[..., k0 : k0 + step]) for k0 in range(0, length, step))
    out, lse = _merged(_attend(grouped, _gather(k_cache, block, keys).transpose(1, 2),
                               _gather(v_cache, block, keys).transpose(1, 2), seen, variant)
                       for block, keys, seen in blocks)
    group_sinks = None if variant.sinks is None else variant.sinks.view(kv_heads, -1)  # [Hkv, H / Hkv]
    return _with_sinks(out, lse, group_sinks).reshape(num_seqs, heads, dim).to(q.dtype)


def _attend(q, k, v, visible, variant: _Variant, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, H, q, D] in fp32 attending to k, v: [B, Hkv, L, D] (H / Hkv query heads per kv head)
    where visible (bool, broadcastable to [B, H, q, L]; None: everywhere, or with `causal`, which
    needs no softcap, the causal square q = L) -> out [B, H, q, D] and its logsumexp [B, H, q], in
    fp32; a query that sees none of the keys gets out 0 and logsumexp -inf. Without softcap: torch's
    CPU flash kernel (SDPA's on CPUs), called for its logsumexp too."""
    k, v = k.float(), v.float()
    if variant.softcap is None:
        hidden = None if visible is None else ~visible
        mask = None if hidden is None else torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal,
                                                                              attn_mask=mask, scale=variant.scale)
        if hidden is not None:
            lse = lse.masked_fill(hidden.all(-1), float("-inf"))  # the kernel gives those queries 0
        return out, lse
    group = q.shape[1] // k.shape[1]
    scores = torch.matmul(q, k.repeat_interleave(group, 1).transpose(-1, -2))
    scores.mul_(variant.scale / variant.softcap).tanh_().mul_(variant.softcap)
    if visible is not None:
        scores.masked_fill_(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse.nan_to_num(neginf=0.0)[..., None]).exp_()  # all 0 for a query that sees no key
    return torch.matmul(probs, v.repeat_interleave(group, 1)), lse


def _merged(parts: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (out [..., q, D], lse [..., q]) of attention over the union of disjoint key blocks,
    from `_attend`'s for each block (at least one), merged one at a time."""
    blocks = iter(parts)
    out, lse = next(blocks)
    for part_out, part_lse in blocks:
        total = torch.logaddexp(lse, part_lse)
        out = out * _share(lse, total) + part_out * _share(part_lse, total)
        lse = total
    return out, lse


def _share(lse: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """[..., q, 1]: a block's weight exp(lse - total) in the merged softmax; 0 where no key is seen yet."""
    return torch.exp(lse - total).nan_to_num_(0.0)[..., None]


def _with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """out: [..., q, D] with sinks (None, or logits broadcastable to lse: [..., q]) joining each
    softmax's denominator: out * sigmoid(lse - sink)."""
    return out if sinks is None else out * torch.sigmoid(lse - sinks)[..., None]
