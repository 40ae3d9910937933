"""Kernel kind `attention_prefill`: varlen causal attention over the paged KV cache.

Serves any step: prefill chunks that start mid-context (seq_len > q_len), whole prompts, and
q_len-1 decodes mixed in. The step's new K/V must already be in the cache (the KV write runs
first). Flash-attention online softmax with fp32 state; each program takes BLOCK_Q tokens of
one sequence times the query heads of one kv head (block_m = BLOCK_Q * next_pow2(group) rows),
so GQA reads K/V once per group. A sliding window skips the KV tiles wholly outside it; a
block-sparse layout visits only the tiles of the key blocks that some query of the program sees
(its vertical blocks, then the local range) and masks the rest per query.

Blocks: BLOCK_M (rows per program), BLOCK_N (keys per tile); buckets by head_dim ("d64",
"d128", "d256", see `attention.head_dim_bucket`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.codegen.kernels import check_layout, compiled_grid, load_source, pointer, render_kernel
from kiln.codegen.kernels.attention import AttentionParams, pick_tiles
from kiln.codegen.targets import Target

KIND = "attention_prefill"


@dataclass(frozen=True)
class Variant:
    """attn: the layer; block_m: rows (token x head-in-group) per program; block_n: keys per tile."""

    attn: AttentionParams
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        if self.block_m < max(16, self.attn.group_pad) or self.block_n < 16:
            raise ValueError(f"block_m must be >= max(16, {self.attn.group_pad}) and block_n >= 16: {self}")

    @property
    def block_q(self) -> int:
        """Query tokens per program."""
        return self.block_m // self.attn.group_pad

    @property
    def cache_key(self) -> str:
        return f"{KIND}__{self.attn.key}__bm{self.block_m}_bn{self.block_n}__w{self.num_warps}_s{self.num_stages}"


def choose(target: Target, attn: AttentionParams) -> Variant:
    """The variant `target`'s tiles give this layer (rows grow to hold at least one whole group)."""
    tiles = pick_tiles(KIND, attn, target)
    block_m = max(tiles.block("BLOCK_M"), attn.group_pad)
    # heads narrower than the d64 bucket: three stages spilled on sm_89 (4 heads of 16, one KV head)
    stages = min(tiles.num_stages, 2) if attn.head_dim < 64 else tiles.num_stages
    return Variant(attn, block_m, attn.fit_block_n(tiles.block("BLOCK_N")), tiles.num_warps, stages)


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant, **variant.attn.template_params())


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    act, index = pointer(variant.attn.dtype), pointer("i32")
    sinks = {"p_sinks": act} if variant.attn.sinks else {}
    return {"p_q": act, "p_k_cache": act, "p_v_cache": act, "p_out": act, "p_query_start": index,
            "p_seq_lens": index, "p_block_tables": index, **sinks, "num_seqs": "i32", "max_blocks": "i32"}


def constexprs(variant: Variant) -> dict[str, object]:
    return {**variant.attn.constexprs(), "GROUP_PAD": variant.attn.group_pad, "BLOCK_Q": variant.block_q,
            "BLOCK_N": variant.block_n}


def grid_source(variant: Variant) -> str:
    """An upper bound on all sequences' query tiles (no host sync on query_start), x kv heads."""
    return f"lambda tokens, seqs: (tokens // {variant.block_q} + seqs, {variant.attn.num_kv_heads})"


def grid(variant: Variant, num_tokens: int, num_seqs: int) -> tuple[int, int]:
    return compiled_grid(grid_source(variant))(num_tokens, num_seqs)


def launch(variant: Variant, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           query_start: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
           sinks: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D]; caches: [num_blocks, page_size, Hkv, D]; query_start: [B+1], seq_lens: [B],
    block_tables: [B, M] int32 (the step convention); sinks: [H] for a variant with sinks.
    Returns out: [T, H, D] (allocated when None)."""
    attn, num_seqs = variant.attn, seq_lens.shape[0]
    sinks_arg = attn.check_sinks(sinks)
    attn.check_queries("q", q)
    attn.check_cache(k_cache, v_cache)
    check_layout("query_start", query_start, (num_seqs + 1,), (1,), torch.int32)
    check_layout("seq_lens", seq_lens, (num_seqs,), (1,), torch.int32)
    check_layout("block_tables", block_tables, (num_seqs, block_tables.shape[1]), (block_tables.shape[1], 1), torch.int32)
    out = torch.empty_like(q) if out is None else out
    attn.check_queries("out", out)
    if q.shape[0]:
        load(variant).kernel[grid(variant, q.shape[0], num_seqs)](
            q, k_cache, v_cache, out, query_start, seq_lens, block_tables, *sinks_arg, num_seqs, block_tables.shape[1],
            **constexprs(variant), num_warps=variant.num_warps, num_stages=variant.num_stages,
        )
    return out
