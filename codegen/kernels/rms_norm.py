"""RMSNorm over the last dim (fp32 math), optionally fused with the residual add before it.

Rows are [T, D] (hidden states; heads = 1) or [T, H, D] (per-head q/k norm as in Qwen3, norm over
head_dim). The token strides of the inputs and outputs are variant parameters, so the kernel can
normalize q/k heads in place inside a packed qkv row. With `residual`: h = x + residual is
rounded to the activation dtype, written to residual_out, and normalized.
Blocks: BLOCK_H rows (heads) per program, tile kind "rms_norm", bucket by D (`row_bucket`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kiln.codegen.kernels import (
    TORCH_DTYPES, check_layout, load_source, next_power_of_2, pointer, render_kernel, row_bucket,
)
from kiln.codegen.targets import Target

KIND = "rms_norm"


@dataclass(frozen=True)
class Variant:
    dtype: str  # activations, weight and outputs
    dim: int  # D, the normalized dim
    heads: int  # H; 1 for [T, D] rows
    x_stride: int  # elements between tokens in x (and residual)
    out_stride: int  # elements between tokens in out (and residual_out)
    residual: bool
    block_h: int
    num_warps: int
    num_stages: int = 1

    @property
    def cache_key(self) -> str:
        fused = "__residual" if self.residual else ""
        return (
            f"{KIND}__{self.dtype}__d{self.dim}__h{self.heads}__xs{self.x_stride}__os{self.out_stride}"
            f"{fused}__bh{self.block_h}__w{self.num_warps}"
        )


def choose(
    target: Target, *, dtype: str, dim: int, heads: int = 1, residual: bool = False,
    x_stride: int | None = None, out_stride: int | None = None,
) -> Variant:
    """Strides default to contiguous [T, H, D] (H * D); pass a packed row's width otherwise."""
    tiles = target.tiles(KIND, row_bucket(dim))
    block_h = min(tiles.block("BLOCK_H"), next_power_of_2(heads))
    contiguous = heads * dim
    return Variant(
        dtype, dim, heads, x_stride or contiguous, out_stride or contiguous, residual, block_h,
        tiles.num_warps, tiles.num_stages,
    )


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant, residual=variant.residual)


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    tensor = pointer(variant.dtype)
    residual = {"p_residual": tensor, "p_residual_out": tensor} if variant.residual else {}
    return {"p_x": tensor, **residual, "p_weight": tensor, "p_out": tensor, "eps": "fp32"}


def constexprs(variant: Variant) -> dict[str, object]:
    return {
        "H": variant.heads, "D": variant.dim, "X_STRIDE": variant.x_stride, "OUT_STRIDE": variant.out_stride,
        "BLOCK_H": variant.block_h, "BLOCK_D": next_power_of_2(variant.dim),
    }


def grid(variant: Variant, tokens: int) -> tuple[int, int]:
    """(tokens, head blocks) programs."""
    return (tokens, triton.cdiv(variant.heads, variant.block_h))


def launch(
    variant: Variant, x: torch.Tensor, weight: torch.Tensor, eps: float, *,
    residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
):
    """x: [T, D] (heads = 1) or [T, H, D]; weight: [D] -> out (and residual_out with `residual`).

    Outputs are allocated with out_stride when not given; out may be x, residual_out may be
    residual (in place). Returns out, or (out, residual_out) for the residual variant.
    """
    dtype, tokens = TORCH_DTYPES[variant.dtype], x.shape[0]
    row_shape = (variant.dim,) if x.dim() == 2 else (variant.heads, variant.dim)

    def layout(token_stride):
        return (tokens, *row_shape), (token_stride, *((variant.dim, 1) if x.dim() == 3 else (1,)))

    def output(tensor):
        if tensor is None:
            shape, strides = layout(variant.out_stride)
            tensor = torch.empty_strided(shape, strides, dtype=dtype, device=x.device)
        check_layout("out", tensor, *layout(variant.out_stride), dtype)
        return tensor

    if x.dim() == 2 and variant.heads != 1:
        raise ValueError(f"{variant.cache_key} normalizes [T, H, D] rows; got x of shape {tuple(x.shape)}")
    check_layout("x", x, *layout(variant.x_stride), dtype)
    check_layout("weight", weight, (variant.dim,), (1,), dtype)
    if (residual is not None) != variant.residual:
        raise ValueError(f"{variant.cache_key}: residual must be given exactly when the variant fuses it")
    out = output(out)
    residual_args = ()
    if variant.residual:
        check_layout("residual", residual, *layout(variant.x_stride), dtype)
        residual_out = output(residual_out)
        residual_args = (residual, residual_out)
    if tokens:
        load(variant).kernel[grid(variant, tokens)](
            x, *residual_args, weight, out, eps, **constexprs(variant), num_warps=variant.num_warps
        )
    return (out, residual_out) if variant.residual else out
