"""What the paged attention kernels share: the layer in kernel terms, tile picking, device helpers.

Three kernel kinds use it: `attention_prefill` (varlen, any mix of prefill chunks and decodes),
`attention_decode` (one query per sequence, optionally split-K) and `attention_reduce` (combines
split-K partials). Their device functions (reading the paged KV cache, soft-capping scores, one
online-softmax step) live in kiln.runtime.triton_device, which the rendered kernels import; the
templates render only what varies (sliding window, block-sparse layout, softcap, sinks,
split-K). Tiles: the target's table, per kind and head_dim bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, float_tag, next_power_of_2
from kiln.codegen.targets import Target, TileConfig
from kiln.errors import KilnError
from kiln.ir.specs import AttentionKind, AttentionSpec, BlockSparseLayout
from kiln.runtime.step_support import visible_keys


@dataclass(frozen=True)
class AttentionParams:
    """One attention layer as the kernels see it (always causal over the paged context).

    dtype: activation and KV-cache dtype ("fp32", "fp16", "bf16"). page_size: tokens per KV
    block. window: a query at p sees keys at positions > p - window. softcap: s = c * tanh(s / c).
    scale: None means 1 / sqrt(head_dim). sinks: a learned per-head logit sinks[h] joins every
    softmax denominator (it attends to no value); the kernels then take sinks: [num_heads].
    block_sparse: a `BlockSparseLayout` as (block_size, local_blocks, vertical_stride), a plain
    tuple so that a variant stays a literal in generated programs; its block_size is a multiple of
    page_size, and the kernels visit only the KV tiles of the blocks it lets a query see.
    """

    dtype: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None
    sinks: bool = False
    block_sparse: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.dtype not in TORCH_DTYPES:
            raise KilnError(f"attention dtype {self.dtype!r} is not supported; use one of {', '.join(TORCH_DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise KilnError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}; "
                            "check the model config")
        if self.head_dim < 16 or self.page_size < 1:
            raise KilnError(f"attention needs head_dim >= 16 (got {self.head_dim}) and a KV page size >= 1 "
                            f"(got {self.page_size})")
        if self.window is not None and self.window < 1:
            raise KilnError(f"sliding window must be >= 1 token, got {self.window}; check the model config")
        if self.block_sparse is not None:
            layout = BlockSparseLayout(*self.block_sparse)  # checks every field >= 1
            if layout.block_size % self.page_size or self.window is not None:
                raise KilnError(f"a block-sparse layout needs a block size that is a multiple of the KV page size "
                                f"{self.page_size} and no sliding window, got {layout} with window={self.window}")

    @classmethod
    def from_spec(cls, spec: AttentionSpec, dtype: str) -> AttentionParams:
        """The kernels' view of an IR attention spec (causal dense, sliding-window or block-sparse)."""
        if not spec.causal:
            raise KilnError(f"the paged attention kernels run causal attention only, not {spec}")
        layout = spec.block_sparse if spec.kind is AttentionKind.BLOCK_SPARSE else None
        return cls(dtype, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.kv_layout.block_size,
                   window=spec.window if spec.kind is AttentionKind.SLIDING_WINDOW else None,
                   softcap=spec.softcap, scale=spec.scale, sinks=spec.sinks,
                   block_sparse=None if layout is None else (layout.block_size, layout.local_blocks,
                                                              layout.vertical_stride))

    @property
    def layout(self) -> BlockSparseLayout | None:
        """The block-sparse layout, or None for dense and sliding-window layers."""
        return None if self.block_sparse is None else BlockSparseLayout(*self.block_sparse)

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def group_pad(self) -> int:
        return next_power_of_2(self.group)

    @property
    def block_d(self) -> int:
        return next_power_of_2(self.head_dim)

    @property
    def effective_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def fit_block_n(self, block_n: int) -> int:
        """Keys per KV tile: a tile table's `block_n`, shrunk for a block-sparse layout to the
        largest power of two dividing its block size (at least 16, what tl.dot needs), so that a
        layout block is whole tiles (else the last tile of each block is part-masked: tiles never
        cross a block's end)."""
        if self.block_sparse is None:
            return block_n
        block_size = self.block_sparse[0]
        return min(block_n, max(16, block_size & -block_size))

    def visible_keys(self, context: int) -> int:
        """How many keys the query at position context - 1 sees (split-K decode sizes on it)."""
        return visible_keys(context, self.window, self.block_sparse)

    @property
    def key(self) -> str:
        """Cache-key fragment, e.g. `bf16__h9_kv3_d64__p16__causal`, `...__swa512__cap30` or
        `...__sparse64_local4_stride8` (block-sparse: block size, local blocks, vertical stride)."""
        parts = [self.dtype, f"h{self.num_heads}_kv{self.num_kv_heads}_d{self.head_dim}", f"p{self.page_size}"]
        if self.block_sparse is not None:
            parts.append("sparse{}_local{}_stride{}".format(*self.block_sparse))
        else:
            parts.append(f"swa{self.window}" if self.window is not None else "causal")
        if self.softcap is not None:
            parts.append(f"cap{float_tag(self.softcap)}")
        if self.scale is not None:
            parts.append(f"scale{float_tag(self.scale)}")
        if self.sinks:
            parts.append("sinks")
        return "__".join(parts)

    def template_params(self) -> dict:
        """What the attention templates render: the variant flags and the dot precision."""
        return {
            "window": self.window,
            "block_sparse": self.layout,
            "softcap": None if self.softcap is None else repr(float(self.softcap)),
            "sinks": self.sinks,
            "dot_precision": "ieee" if self.dtype == "fp32" else "tf32",  # tf32 only matters for fp32
        }

    def constexprs(self) -> dict:
        """Constexpr arguments of the prefill and decode kernels."""
        return {
            "NUM_HEADS": self.num_heads, "NUM_KV_HEADS": self.num_kv_heads, "GROUP": self.group,
            "HEAD_DIM": self.head_dim, "BLOCK_D": self.block_d, "PAGE_SIZE": self.page_size,
            "SCALE": self.effective_scale,
        }

    def check_queries(self, name: str, q: torch.Tensor) -> None:
        """q (or out): contiguous [T, num_heads, head_dim] in our dtype."""
        shape = (q.shape[0], self.num_heads, self.head_dim)
        check_layout(name, q, shape, (self.num_heads * self.head_dim, self.head_dim, 1), self.torch_dtype)

    def check_sinks(self, sinks: torch.Tensor | None) -> tuple:
        """The launch's sinks argument: () without sinks, else (sinks,) checked as [num_heads]."""
        if (sinks is not None) != self.sinks:
            raise ValueError(f"this variant {'needs' if self.sinks else 'takes no'} sinks")
        if sinks is None:
            return ()
        check_layout("sinks", sinks, (self.num_heads,), (1,), self.torch_dtype)
        return (sinks,)

    def check_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """k_cache, v_cache: contiguous [num_blocks, page_size, num_kv_heads, head_dim] in our dtype."""
        check_caches(k_cache, v_cache, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                     dtype=self.torch_dtype, page_size=self.page_size)


def head_dim_bucket(head_dim: int) -> str:
    """Tile-table bucket of the attention kernels: "d64" (<= 64), "d128" (<= 128) or "d256"."""
    if head_dim <= 64:
        return "d64"
    return "d128" if head_dim <= 128 else "d256"


def pick_tiles(kind: str, attn: AttentionParams, target: Target) -> TileConfig:
    """`target`'s tiles for attention kernel `kind` at this layer's head_dim bucket."""
    return target.tiles(kind, head_dim_bucket(attn.head_dim))


def check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, *, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, page_size: int | None = None) -> None:
    """k_cache, v_cache: contiguous [num_blocks, page_size, num_kv_heads, head_dim] of `dtype`
    (any page size when None)."""
    shape = (k_cache.shape[0], page_size or k_cache.shape[1], num_kv_heads, head_dim)
    strides = (shape[1] * num_kv_heads * head_dim, num_kv_heads * head_dim, head_dim, 1)
    check_layout("k_cache", k_cache, shape, strides, dtype)
    check_layout("v_cache", v_cache, shape, strides, dtype)
