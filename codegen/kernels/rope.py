"""Rotary position embedding (Llama/NeoX rotate_half layout) on x: [T, H, D], fp32 math.

angle = float(positions[t]) * inv_freq[i]; out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin with
x1 = x[..., :D/2], x2 = x[..., D/2:]. inv_freq comes precomputed (rope scaling lives elsewhere).
The token stride is a variant parameter, so q and k can be rotated in place inside a packed qkv
row, both in one launch: their heads are consecutive, so pass qkv viewed as [T, H + Hkv, D].
Blocks: BLOCK_H heads per program, tile kind "rope", bucket "default".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, load_source, next_power_of_2, pointer, render_kernel
from kiln.codegen.targets import Target
from kiln.errors import KilnError

KIND = "rope"


@dataclass(frozen=True)
class Variant:
    dtype: str  # x and out
    heads: int  # H
    head_dim: int  # D, even
    x_stride: int  # elements between tokens in x
    out_stride: int | None  # elements between tokens in out; None rotates x in place
    block_h: int
    num_warps: int
    num_stages: int = 1

    @property
    def inplace(self) -> bool:
        return self.out_stride is None

    @property
    def cache_key(self) -> str:
        destination = "inplace" if self.inplace else f"os{self.out_stride}"
        return (
            f"{KIND}__{self.dtype}__h{self.heads}__d{self.head_dim}__xs{self.x_stride}__{destination}"
            f"__bh{self.block_h}__w{self.num_warps}"
        )


def choose(
    target: Target, *, dtype: str, heads: int, head_dim: int, inplace: bool,
    x_stride: int | None = None, out_stride: int | None = None,
) -> Variant:
    """Strides default to contiguous [T, H, D]; out_stride is ignored when rotating in place."""
    if head_dim % 2:
        raise KilnError(f"rotary embedding needs an even head_dim, got {head_dim}; check the model config")
    tiles = target.tiles(KIND, "default")
    contiguous = heads * head_dim
    return Variant(
        dtype, heads, head_dim, x_stride or contiguous, None if inplace else out_stride or contiguous,
        min(tiles.block("BLOCK_H"), next_power_of_2(heads)), tiles.num_warps, tiles.num_stages,
    )


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant, inplace=variant.inplace)


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    out = {} if variant.inplace else {"p_out": pointer(variant.dtype)}
    return {"p_x": pointer(variant.dtype), **out, "p_positions": pointer("i32"), "p_inv_freq": pointer("fp32")}


def constexprs(variant: Variant) -> dict[str, object]:
    out_stride = {} if variant.inplace else {"OUT_STRIDE": variant.out_stride}
    half = variant.head_dim // 2
    return {
        "H": variant.heads, "HALF": half, "X_STRIDE": variant.x_stride, **out_stride,
        "BLOCK_H": variant.block_h, "BLOCK_HALF": next_power_of_2(half),
    }


def grid(variant: Variant, tokens: int) -> tuple[int, int]:
    """(tokens, head blocks) programs."""
    return (tokens, triton.cdiv(variant.heads, variant.block_h))


def launch(
    variant: Variant, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [T, H, D]; positions: [T] int32; inv_freq: [D/2] fp32 -> the rotated tensor.

    In-place variants rotate and return x; others write `out` (allocated when not given).
    """
    dtype, tokens, head_dim = TORCH_DTYPES[variant.dtype], x.shape[0], variant.head_dim
    shape = (tokens, variant.heads, head_dim)
    check_layout("x", x, shape, (variant.x_stride, head_dim, 1), dtype)
    check_layout("positions", positions, (tokens,), (1,), torch.int32)
    check_layout("inv_freq", inv_freq, (head_dim // 2,), (1,), torch.float32)
    destination = ()
    if not variant.inplace:
        strides = (variant.out_stride, head_dim, 1)
        out = torch.empty_strided(shape, strides, dtype=dtype, device=x.device) if out is None else out
        check_layout("out", out, shape, strides, dtype)
        destination = (out,)
    if tokens:
        load(variant).kernel[grid(variant, tokens)](
            x, *destination, positions, inv_freq, **constexprs(variant), num_warps=variant.num_warps
        )
    return x if variant.inplace else out
