"""Kernel kind `attention_reduce`: combines split-K decode partials (flash-decoding, pass two).

`attention_decode` with split_k writes per split an fp32 partial (max in log2 units, sum,
unnormalised acc); this kernel weighs them by 2^(max_s - max) into the output. One program per
(sequence, head) row, a loop over the splits; the split count is a runtime argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, load_source, next_power_of_2, pointer, render_kernel

KIND = "attention_reduce"


@dataclass(frozen=True)
class Variant:
    dtype: str  # of out (and sinks)
    num_heads: int
    head_dim: int
    sinks: bool  # a per-head logit sinks[h] joins the softmax denominator
    num_warps: int = 1
    num_stages: int = 1

    @property
    def cache_key(self) -> str:
        sinks = "__sinks" if self.sinks else ""
        return f"{KIND}__{self.dtype}__h{self.num_heads}_d{self.head_dim}{sinks}__w{self.num_warps}"


def choose(*, dtype: str, num_heads: int, head_dim: int, sinks: bool = False) -> Variant:
    """A warp per 128 columns; the kernel is a few loads per split, the same on every target."""
    return Variant(dtype, num_heads, head_dim, sinks, num_warps=max(1, next_power_of_2(head_dim) // 128))


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
    return {"NUM_HEADS": variant.num_heads, "HEAD_DIM": variant.head_dim, "BLOCK_D": next_power_of_2(variant.head_dim)}


def grid(batch: int, variant: Variant) -> tuple[int]:
    return (batch * variant.num_heads,)


def launch(variant: Variant, part_max: torch.Tensor, part_sum: torch.Tensor, part_acc: torch.Tensor,
           out: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """part_max, part_sum: [B, H, S] fp32; part_acc: [B, H, S, D] fp32; sinks: [H] when the
    variant has sinks -> out: [B, H, D] (contiguous)."""
    batch, heads, splits = part_max.shape[0], variant.num_heads, part_max.shape[2]
    dim, dtype = variant.head_dim, TORCH_DTYPES[variant.dtype]
    if (sinks is not None) != variant.sinks:
        raise ValueError(f"this variant {'needs' if variant.sinks else 'takes no'} sinks")
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
