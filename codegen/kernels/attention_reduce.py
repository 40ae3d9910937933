"""Kernel kind `attention_reduce`: combines split-K decode partials (flash-decoding, pass two).

`attention_decode` with split_k writes per split an fp32 partial (max in log2 units, sum,
unnormalised acc); this kernel weighs them by 2^(max_s - max) into the output. One program per
(sequence, head) row loads all its splits at once, a [BLOCK_S, BLOCK_D] tile (BLOCK_S: a power of
two covering the most splits decode ever uses, MAX_DECODE_SPLITS; rows past the step's split
count, a runtime argument, are masked off), and reduces it vectorised: no loop over the splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, compiled_grid, load_source, next_power_of_2, pointer, render_kernel
from kiln.runtime.step_support import MAX_DECODE_SPLITS

KIND = "attention_reduce"
BLOCK_S = next_power_of_2(MAX_DECODE_SPLITS)  # split rows per tile: every split count decode uses


@dataclass(frozen=True)
class Variant:
    dtype: str  # of out (and sinks)
    num_heads: int
    head_dim: int
    sinks: bool  # a per-head logit sinks[h] joins the softmax denominator
    block_s: int = BLOCK_S  # split rows per tile (>= the step's split count)
    num_warps: int = 4
    num_stages: int = 1

    @property
    def cache_key(self) -> str:
        sinks = "__sinks" if self.sinks else ""
        return f"{KIND}__{self.dtype}__h{self.num_heads}_d{self.head_dim}{sinks}__s{self.block_s}__w{self.num_warps}"


def choose(*, dtype: str, num_heads: int, head_dim: int, sinks: bool = False) -> Variant:
    """The same on every target (a few coalesced loads and two reductions): 4 warps, 8 for tiles
    over 4096 values (head_dim > 128), so each thread keeps at most 32 fp32 values of the tile."""
    values = BLOCK_S * next_power_of_2(head_dim)
    return Variant(dtype, num_heads, head_dim, sinks, num_warps=min(8, max(4, values // (32 * 32))))


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant, sinks=variant.sinks)


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    part = pointer("fp32")
    sinks = {"p_sinks": pointer(variant.dtype)} if variant.sinks else {}
    return {"p_part_max": part, "p_part_sum": part, "p_part_acc": part, "p_out": pointer(variant.dtype), **sinks,
            "num_splits": "i32"}


def constexprs(variant: Variant) -> dict[str, object]:
    return {"NUM_HEADS": variant.num_heads, "HEAD_DIM": variant.head_dim, "BLOCK_S": variant.block_s,
            "BLOCK_D": next_power_of_2(variant.head_dim)}


def grid_source(variant: Variant) -> str:
    """One program per (sequence, head)."""
    return f"lambda batch: (batch * {variant.num_heads},)"


def grid(batch: int, variant: Variant) -> tuple[int]:
    return compiled_grid(grid_source(variant))(batch)


def launch(variant: Variant, part_max: torch.Tensor, part_sum: torch.Tensor, part_acc: torch.Tensor,
           out: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """part_max, part_sum: [B, H, S] fp32; part_acc: [B, H, S, D] fp32; sinks: [H] when the
    variant has sinks -> out: [B, H, D] (contiguous)."""
    batch, heads, splits = part_max.shape[0], variant.num_heads, part_max.shape[2]
    dim, dtype = variant.head_dim, TORCH_DTYPES[variant.dtype]
    if (sinks is not None) != variant.sinks:
        raise ValueError(f"this variant {'needs' if variant.sinks else 'takes no'} sinks")
    if not 1 <= splits <= variant.block_s:
        raise ValueError(f"{splits} splits: this variant combines 1 to {variant.block_s}")
    if sinks is not None:
        check_layout("sinks", sinks, (heads,), (1,), dtype)
    for name, part in (("part_max", part_max), ("part_sum", part_sum)):
        check_layout(name, part, (batch, heads, splits), (heads * splits, splits, 1), torch.float32)
    check_layout("part_acc", part_acc, (batch, heads, splits, dim), (heads * splits * dim, splits * dim, dim, 1),
                 torch.float32)
    check_layout("out", out, (batch, heads, dim), (heads * dim, dim, 1), dtype)
    if batch:
        load(variant).kernel[grid(batch, variant)](
            part_max, part_sum, part_acc, out, *(() if sinks is None else (sinks,)), splits, **constexprs(variant),
            num_warps=variant.num_warps,
        )
    return out
