"""Row gather: out[R, D] = table[index[R]].

One kernel serves both the embedding lookup (table = embedding weight [V, D], index = input_ids)
and the last-token gather before the LM head (table = hidden states [T, D], index =
logits_indices). Blocks: BLOCK_D columns per program (tile kind "gather_rows", bucket "default").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kiln.codegen.kernels import (
    TORCH_DTYPES, check_layout, load_source, next_power_of_2, pointer, render_kernel,
)
from kiln.codegen.targets import Target

KIND = "gather_rows"


@dataclass(frozen=True)
class Variant:
    dtype: str  # "bf16", "fp16" or "fp32": table and out
    dim: int  # D
    block_d: int
    num_warps: int
    num_stages: int = 1

    @property
    def cache_key(self) -> str:
        return f"{KIND}__{self.dtype}__d{self.dim}__b{self.block_d}__w{self.num_warps}"


def choose(target: Target, *, dtype: str, dim: int) -> Variant:
    tiles = target.tiles(KIND, "default")
    block_d = min(tiles.block("BLOCK_D"), next_power_of_2(dim))
    return Variant(dtype, dim, block_d, tiles.num_warps, tiles.num_stages)


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant)


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    return {"p_index": pointer("i32"), "p_table": pointer(variant.dtype), "p_out": pointer(variant.dtype)}


def constexprs(variant: Variant) -> dict[str, object]:
    return {"D": variant.dim, "BLOCK_D": variant.block_d}


def grid(variant: Variant, rows: int) -> tuple[int, int]:
    """(rows, column blocks) programs."""
    return (rows, triton.cdiv(variant.dim, variant.block_d))


def launch(variant: Variant, index: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """index: [R] int32, each in [0, table rows); table: [V, D] contiguous -> out: [R, D]."""
    dtype, rows = TORCH_DTYPES[variant.dtype], index.shape[0]
    check_layout("index", index, (rows,), (1,), torch.int32)
    check_layout("table", table, (table.shape[0], variant.dim), (variant.dim, 1), dtype)
    if out is None:
        out = torch.empty(rows, variant.dim, dtype=dtype, device=table.device)
    check_layout("out", out, (rows, variant.dim), (variant.dim, 1), dtype)
    if rows:
        load(variant).kernel[grid(variant, rows)](index, table, out, **constexprs(variant), num_warps=variant.num_warps)
    return out
