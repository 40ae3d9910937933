"""SiLU-gated product: out[T, N] = silu(x[T, :N]) * x[T, N:] (gate and up packed side by side).

The GEMM can fuse this into its epilogue (gemm epilogue "silu_mul"); this standalone kernel is
for graphs where the packed gate/up projection stays a separate matmul.
Blocks: BLOCK_N output columns per program, tile kind "silu_mul", bucket "default".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, load_source, next_power_of_2, pointer, render_kernel
from kiln.codegen.targets import Target

KIND = "silu_mul"


@dataclass(frozen=True)
class Variant:
    dtype: str  # x and out
    dim: int  # N, the output width (x is [T, 2N])
    block_n: int
    num_warps: int
    num_stages: int = 1

    @property
    def cache_key(self) -> str:
        return f"{KIND}__{self.dtype}__n{self.dim}__b{self.block_n}__w{self.num_warps}"


def choose(target: Target, *, dtype: str, dim: int) -> Variant:
    tiles = target.tiles(KIND, "default")
    return Variant(dtype, dim, min(tiles.block("BLOCK_N"), next_power_of_2(dim)), tiles.num_warps, tiles.num_stages)


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant)


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    return {"p_x": pointer(variant.dtype), "p_out": pointer(variant.dtype)}


def constexprs(variant: Variant) -> dict[str, object]:
    return {"N": variant.dim, "BLOCK_N": variant.block_n}


def grid(variant: Variant, tokens: int) -> tuple[int, int]:
    """(tokens, column blocks) programs."""
    return (tokens, triton.cdiv(variant.dim, variant.block_n))


def launch(variant: Variant, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, 2N] contiguous -> out: [T, N]."""
    dtype, tokens, width = TORCH_DTYPES[variant.dtype], x.shape[0], variant.dim
    check_layout("x", x, (tokens, 2 * width), (2 * width, 1), dtype)
    out = torch.empty(tokens, width, dtype=dtype, device=x.device) if out is None else out
    check_layout("out", out, (tokens, width), (width, 1), dtype)
    if tokens:
        load(variant).kernel[grid(variant, tokens)](x, out, **constexprs(variant), num_warps=variant.num_warps)
    return out
