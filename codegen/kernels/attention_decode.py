"""Kernel kind `attention_decode`: paged attention for steps where every sequence has one query.

The query heads sharing a kv head attend together (BLOCK_H = max(16, next_pow2(group)) rows),
so K/V is read once per group. With split_k (flash-decoding) the visible context of each
sequence is cut into S chunks run by separate programs, each writing an fp32 partial, and
`attention_reduce` combines them: this fills the GPU when batch * num_kv_heads programs alone
would leave SMs idle (`choose_num_splits`). S is a launch argument, not a variant parameter.
A block-sparse layout's query visits only the tiles of the key blocks it sees (its vertical
blocks, then its local range), and split-K divides those tiles, not the whole context.

Blocks: BLOCK_N (keys per tile); buckets by head_dim ("d64", "d128", "d256").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.codegen.kernels import attention_reduce, check_layout, compiled_grid, load_source, pointer, render_kernel
from kiln.codegen.kernels.attention import AttentionParams, pick_tiles
from kiln.codegen.targets import Target
from kiln.runtime.step_support import MAX_DECODE_SPLITS as MAX_SPLITS  # noqa: F401  (the split rule's bounds)
from kiln.runtime.step_support import MIN_SPLIT_TOKENS, decode_splits  # noqa: F401

KIND = "attention_decode"


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, target: Target) -> int:
    """How many context chunks split-K decode uses on `target` (step_support.decode_splits, which
    the step programs call); with a window or a block-sparse layout, pass as max_context the keys
    its query sees (`AttentionParams.visible_keys`)."""
    return decode_splits(batch, num_kv_heads, max_context, target.sm_count)


@dataclass(frozen=True)
class Variant:
    """attn: the layer; split_k: write partials for `attention_reduce`; block_n: keys per tile."""

    attn: AttentionParams
    split_k: bool
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def block_h(self) -> int:
        """Query-head rows per program (tl.dot needs at least 16)."""
        return max(16, self.attn.group_pad)

    @property
    def takes_sinks(self) -> bool:
        """Whether this kernel reads sinks (with split-K, the reduce kernel adds them instead)."""
        return self.attn.sinks and not self.split_k

    @property
    def cache_key(self) -> str:
        split = "__splitk" if self.split_k else ""
        return f"{KIND}__{self.attn.key}{split}__bn{self.block_n}__w{self.num_warps}_s{self.num_stages}"


def choose(target: Target, attn: AttentionParams, *, split_k: bool) -> Variant:
    tiles = pick_tiles(KIND, attn, target)
    # heads narrower than the d64 bucket take 32-key tiles: 64 spilled with a window (d16, all archs)
    block_n = min(tiles.block("BLOCK_N"), 32) if attn.head_dim < 64 else tiles.block("BLOCK_N")
    return Variant(attn, split_k, attn.fit_block_n(block_n), tiles.num_warps, tiles.num_stages)


def render(variant: Variant) -> str:
    params = {**variant.attn.template_params(), "sinks": variant.takes_sinks}
    return render_kernel(KIND, variant, split_k=variant.split_k, **params)


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    act, index, part = pointer(variant.attn.dtype), pointer("i32"), pointer("fp32")
    outputs = {"p_part_max": part, "p_part_sum": part, "p_part_acc": part} if variant.split_k else {"p_out": act}
    sinks = {"p_sinks": act} if variant.takes_sinks else {}
    return {"p_q": act, "p_k_cache": act, "p_v_cache": act, **outputs, "p_seq_lens": index,
            "p_block_tables": index, **sinks, "max_blocks": "i32"}


def constexprs(variant: Variant) -> dict[str, object]:
    return {**variant.attn.constexprs(), "BLOCK_H": variant.block_h, "BLOCK_N": variant.block_n}


def grid_source(variant: Variant) -> str:
    """(B, Hkv) programs, times the splits for a split-K variant."""
    heads = variant.attn.num_kv_heads
    return f"lambda batch, splits: (batch, {heads}, splits)" if variant.split_k else f"lambda batch, splits: (batch, {heads})"


def grid(variant: Variant, batch: int, num_splits: int) -> tuple[int, ...]:
    return compiled_grid(grid_source(variant))(batch, num_splits)


def reduce_variant(variant: Variant) -> attention_reduce.Variant:
    """The `attention_reduce` kernel a split-K variant launches after itself."""
    attn = variant.attn
    return attention_reduce.choose(dtype=attn.dtype, num_heads=attn.num_heads, head_dim=attn.head_dim, sinks=attn.sinks)


def launch(variant: Variant, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           seq_lens: torch.Tensor, block_tables: torch.Tensor, *, sinks: torch.Tensor | None = None,
           num_splits: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, D]; caches: [num_blocks, page_size, Hkv, D]; seq_lens: [B] (the query of
    sequence b sits at position seq_lens[b] - 1); block_tables: [B, M] int32; sinks: [H] for a
    layer with sinks. num_splits > 1 needs a split_k variant (fp32 partials [B, H, S(, D)] are
    allocated here). Returns out: [B, H, D] (allocated when None)."""
    attn, batch = variant.attn, q.shape[0]
    if num_splits < 1 or (num_splits > 1 and not variant.split_k):
        raise ValueError(f"num_splits={num_splits} needs >= 1, and a split_k variant when > 1")
    sinks_arg = attn.check_sinks(sinks)
    attn.check_queries("q", q)
    attn.check_cache(k_cache, v_cache)
    check_layout("seq_lens", seq_lens, (batch,), (1,), torch.int32)
    check_layout("block_tables", block_tables, (batch, block_tables.shape[1]), (block_tables.shape[1], 1), torch.int32)
    out = torch.empty_like(q) if out is None else out
    attn.check_queries("out", out)
    if not batch:
        return out
    kernel = load(variant).kernel[grid(variant, batch, num_splits)]
    options = {**constexprs(variant), "num_warps": variant.num_warps, "num_stages": variant.num_stages}
    if not variant.split_k:
        kernel(q, k_cache, v_cache, out, seq_lens, block_tables, *sinks_arg, block_tables.shape[1], **options)
        return out
    part_max = torch.empty(batch, attn.num_heads, num_splits, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(batch, attn.num_heads, num_splits, attn.head_dim, dtype=torch.float32, device=q.device)
    kernel(q, k_cache, v_cache, part_max, part_sum, part_acc, seq_lens, block_tables, block_tables.shape[1], **options)
    return attention_reduce.launch(reduce_variant(variant), part_max, part_sum, part_acc, out, *sinks_arg)
