"""Kernel kind `kv_write`: stores the step's new K/V into the paged cache at slot_mapping.

k, v: [T, Hkv, D], both with the same token stride (contiguous, or the k/v slices of a packed
qkv row); slot -1 skips a token (padding). The fused form that also applies rotary embedding
to q and k straight from the qkv projection is `kv_write_rope`. One program per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, load_source, next_power_of_2, pointer, render_kernel

KIND = "kv_write"


@dataclass(frozen=True)
class Variant:
    dtype: str  # of k, v and the caches
    num_kv_heads: int
    head_dim: int
    token_stride: int  # elements between tokens in k and in v
    num_warps: int
    num_stages: int = 1

    @property
    def row(self) -> int:
        """Values per token: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def cache_key(self) -> str:
        return f"{KIND}__{self.dtype}__kv{self.num_kv_heads}_d{self.head_dim}__ts{self.token_stride}__w{self.num_warps}"


def choose(*, dtype: str, num_kv_heads: int, head_dim: int, token_stride: int | None = None) -> Variant:
    """token_stride defaults to contiguous k/v; one warp per 256 values of a token's row (<= 8)."""
    row = num_kv_heads * head_dim
    return Variant(dtype, num_kv_heads, head_dim, token_stride or row, num_warps=min(8, max(1, row // 256)))


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant)


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    act = pointer(variant.dtype)
    return {"p_k": act, "p_v": act, "p_slot_mapping": pointer("i32"), "p_k_cache": act, "p_v_cache": act}


def constexprs(variant: Variant) -> dict[str, object]:
    return {"ROW": variant.row, "TOKEN_STRIDE": variant.token_stride, "BLOCK": next_power_of_2(variant.row)}


def check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, *, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, page_size: int | None = None) -> None:
    """k_cache, v_cache: contiguous [num_blocks, page_size, num_kv_heads, head_dim] of `dtype`
    (any page size when None)."""
    shape = (k_cache.shape[0], page_size or k_cache.shape[1], num_kv_heads, head_dim)
    strides = (shape[1] * num_kv_heads * head_dim, num_kv_heads * head_dim, head_dim, 1)
    check_layout("k_cache", k_cache, shape, strides, dtype)
    check_layout("v_cache", v_cache, shape, strides, dtype)


def grid(variant: Variant, tokens: int) -> tuple[int]:
    """One program per token."""
    return (tokens,)


def launch(variant: Variant, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
           k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (token stride variant.token_stride); slot_mapping: [T] int32;
    k_cache, v_cache: [num_blocks, page_size, Hkv, D], written in place."""
    dtype, tokens = TORCH_DTYPES[variant.dtype], k.shape[0]
    shape, strides = (tokens, variant.num_kv_heads, variant.head_dim), (variant.token_stride, variant.head_dim, 1)
    check_layout("k", k, shape, strides, dtype)
    check_layout("v", v, shape, strides, dtype)
    check_layout("slot_mapping", slot_mapping, (tokens,), (1,), torch.int32)
    check_caches(k_cache, v_cache, num_kv_heads=variant.num_kv_heads, head_dim=variant.head_dim, dtype=dtype)
    if tokens:
        load(variant).kernel[grid(variant, tokens)](k, v, slot_mapping, k_cache, v_cache, **constexprs(variant),
                                        num_warps=variant.num_warps)
