"""Kernel kind `head_norm_rope`: per-head RMSNorm, then rotary embedding (Qwen3's q/k norms),
and for k the paged KV write of k and v, in one launch.

Reads the q or k heads x[T, H, D] of the packed projection (token stride x_stride), normalizes
each head over D in fp32 and scales it by weight[D], rotates it (Llama/NeoX rotate_half,
angle = float(position) * inv_freq[i], fp32) and rounds once to the activation dtype:
  q (kv_write=False)  into out[T, H, D];
  k (kv_write=True)   into k_cache at slot_mapping[t], with v[T, H, D] (same token stride)
                      copied into v_cache (slot -1: no writes).
One program per token; every head of the token in one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, load_source, next_power_of_2, pointer, render_kernel
from kiln.codegen.kernels.kv_write import check_caches
from kiln.errors import KilnError

KIND = "head_norm_rope"


@dataclass(frozen=True)
class Variant:
    dtype: str  # of x, weight, v, out and the caches
    num_heads: int
    head_dim: int  # even
    x_stride: int  # elements between tokens in x (and v)
    kv_write: bool  # k: write the result and v to the caches; q: write the result to out
    num_warps: int
    num_stages: int = 1

    @property
    def cache_key(self) -> str:
        kv = "__kv" if self.kv_write else ""
        return f"{KIND}__{self.dtype}__h{self.num_heads}_d{self.head_dim}__xs{self.x_stride}{kv}__w{self.num_warps}"


def choose(*, dtype: str, num_heads: int, head_dim: int, x_stride: int, kv_write: bool) -> Variant:
    """One warp per 512 values of the heads (<= 8)."""
    if head_dim % 2:
        raise KilnError(f"rotary embedding needs an even head_dim, got {head_dim}; check the model config")
    return Variant(dtype, num_heads, head_dim, x_stride, kv_write, num_warps=min(8, max(1, num_heads * head_dim // 512)))


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant, kv_write=variant.kv_write)


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    act, index = pointer(variant.dtype), pointer("i32")
    outputs = ({"p_v": act, "p_slot_mapping": index, "p_k_cache": act, "p_v_cache": act} if variant.kv_write
               else {"p_out": act})
    return {"p_x": act, "p_weight": act, "p_positions": index, "p_inv_freq": pointer("fp32"), **outputs, "eps": "fp32"}


def constexprs(variant: Variant) -> dict[str, object]:
    return {"NUM_HEADS": variant.num_heads, "HEAD_DIM": variant.head_dim, "X_STRIDE": variant.x_stride,
            "BLOCK_H": next_power_of_2(variant.num_heads), "BLOCK_HALF": next_power_of_2(variant.head_dim // 2)}


def grid(variant: Variant, tokens: int) -> tuple[int]:
    """One program per token."""
    return (tokens,)


def launch(variant: Variant, x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           eps: float, *, out: torch.Tensor | None = None, v: torch.Tensor | None = None,
           slot_mapping: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
           v_cache: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (and v): [T, H, D] with token stride variant.x_stride; weight: [D]; positions: [T]
    int32; inv_freq: [D/2] fp32. q: returns out [T, H, D] (allocated when None). k: v,
    slot_mapping [T] int32 and the caches [num_blocks, page_size, H, D] (written in place)."""
    dtype, tokens, heads, dim = TORCH_DTYPES[variant.dtype], x.shape[0], variant.num_heads, variant.head_dim
    rows = ((tokens, heads, dim), (variant.x_stride, dim, 1), dtype)
    check_layout("x", x, *rows)
    check_layout("weight", weight, (dim,), (1,), dtype)
    check_layout("positions", positions, (tokens,), (1,), torch.int32)
    check_layout("inv_freq", inv_freq, (dim // 2,), (1,), torch.float32)
    if variant.kv_write:
        check_layout("v", v, *rows)
        check_layout("slot_mapping", slot_mapping, (tokens,), (1,), torch.int32)
        check_caches(k_cache, v_cache, num_kv_heads=heads, head_dim=dim, dtype=dtype)
        outputs = (v, slot_mapping, k_cache, v_cache)
    else:
        out = torch.empty(tokens, heads, dim, dtype=dtype, device=x.device) if out is None else out
        check_layout("out", out, (tokens, heads, dim), (heads * dim, dim, 1), dtype)
        outputs = (out,)
    if tokens:
        load(variant).kernel[grid(variant, tokens)](x, weight, positions, inv_freq, *outputs, eps,
                                                    **constexprs(variant), num_warps=variant.num_warps)
    return out
