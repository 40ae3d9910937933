"""Kernel kind `kv_write_rope`: rotary embedding fused with the paged KV write.

Reads the packed q/k/v projection output qkv[T, (H + 2*Hkv) * D] once: rotates q into
q_out[T, H, D], rotates k and stores it with v into the caches at slot_mapping (slot -1 skips
the cache writes, q is still written). Rotary layout: Llama/NeoX rotate_half with angle =
float(position) * inv_freq[i], fp32 math (inv_freq is precomputed, so rope scaling lives
elsewhere). One program per token; every head of the token in one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, load_source, next_power_of_2, pointer, render_kernel
from kiln.codegen.kernels.kv_write import check_caches
from kiln.codegen.kernels.triton_helpers import helper
from kiln.errors import KilnError

KIND = "kv_write_rope"


@helper
def rotate_half_heads(p_src, p_dst, o_h, m_h, o_i, m_i, b_cos, b_sin, HALF: tl.constexpr):
    """dst[h] = rope(src[h]) for heads o_h (rows of 2 * HALF contiguous values), fp32 math.

    o_h/m_h: [BLOCK_H] heads and mask; o_i/m_i: [BLOCK_HALF] column within a half;
    b_cos, b_sin: [1, BLOCK_HALF] fp32. out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin.
    """
    o_first = o_h[:, None] * (2 * HALF) + o_i[None, :]
    mask = m_h[:, None] & m_i[None, :]
    b_x1 = tl.load(p_src + o_first, mask=mask, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_src + o_first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_dst + o_first, (b_x1 * b_cos - b_x2 * b_sin).to(p_dst.dtype.element_ty), mask=mask)
    tl.store(p_dst + o_first + HALF, (b_x2 * b_cos + b_x1 * b_sin).to(p_dst.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Variant:
    dtype: str  # of qkv, q_out and the caches
    num_heads: int
    num_kv_heads: int
    head_dim: int  # even
    qkv_stride: int  # elements between tokens in qkv
    num_warps: int
    num_stages: int = 1

    @property
    def cache_key(self) -> str:
        return (f"{KIND}__{self.dtype}__h{self.num_heads}_kv{self.num_kv_heads}_d{self.head_dim}"
                f"__qs{self.qkv_stride}__w{self.num_warps}")


def choose(*, dtype: str, num_heads: int, num_kv_heads: int, head_dim: int, qkv_stride: int | None = None) -> Variant:
    """qkv_stride defaults to a contiguous qkv; one warp per 512 values of a token's qkv row (<= 8)."""
    if head_dim % 2:
        raise KilnError(f"rotary embedding needs an even head_dim, got {head_dim}; check the model config")
    row = (num_heads + 2 * num_kv_heads) * head_dim
    return Variant(dtype, num_heads, num_kv_heads, head_dim, qkv_stride or row, num_warps=min(8, max(1, row // 512)))


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant)


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    act, index = pointer(variant.dtype), pointer("i32")
    return {"p_qkv": act, "p_positions": index, "p_inv_freq": pointer("fp32"), "p_slot_mapping": index,
            "p_q_out": act, "p_k_cache": act, "p_v_cache": act}


def constexprs(variant: Variant) -> dict[str, object]:
    return {
        "NUM_HEADS": variant.num_heads, "NUM_KV_HEADS": variant.num_kv_heads, "HEAD_DIM": variant.head_dim,
        "QKV_STRIDE": variant.qkv_stride, "BLOCK_HQ": next_power_of_2(variant.num_heads),
        "BLOCK_HKV": next_power_of_2(variant.num_kv_heads), "BLOCK_HALF": next_power_of_2(variant.head_dim // 2),
    }


def grid(variant: Variant, tokens: int) -> tuple[int]:
    """One program per token."""
    return (tokens,)


def launch(variant: Variant, qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           q_out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv: [T, (H + 2*Hkv) * D] (token stride variant.qkv_stride); positions, slot_mapping: [T]
    int32; inv_freq: [D/2] fp32; caches: [num_blocks, page_size, Hkv, D], written in place.
    Returns q_out: [T, H, D] (allocated when None)."""
    dtype, tokens = TORCH_DTYPES[variant.dtype], qkv.shape[0]
    heads, dim = variant.num_heads, variant.head_dim
    check_layout("qkv", qkv, (tokens, (heads + 2 * variant.num_kv_heads) * dim), (variant.qkv_stride, 1), dtype)
    check_layout("positions", positions, (tokens,), (1,), torch.int32)
    check_layout("inv_freq", inv_freq, (dim // 2,), (1,), torch.float32)
    check_layout("slot_mapping", slot_mapping, (tokens,), (1,), torch.int32)
    check_caches(k_cache, v_cache, num_kv_heads=variant.num_kv_heads, head_dim=dim, dtype=dtype)
    q_out = torch.empty(tokens, heads, dim, dtype=dtype, device=qkv.device) if q_out is None else q_out
    check_layout("q_out", q_out, (tokens, heads, dim), (heads * dim, dim, 1), dtype)
    if tokens:
        load(variant).kernel[grid(variant, tokens)](qkv, positions, inv_freq, slot_mapping, q_out, k_cache, v_cache,
                                        **constexprs(variant), num_warps=variant.num_warps)
    return q_out
