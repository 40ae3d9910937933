"""What the paged attention kernels share: the layer in kernel terms, tile picking, device helpers.

Three kernel kinds use it: `attention_prefill` (varlen, any mix of prefill chunks and decodes),
`attention_decode` (one query per sequence, optionally split-K) and `attention_reduce` (combines
split-K partials). The device helpers below read the paged KV cache, soft-cap scores and run
one online-softmax step; the templates render only what varies (sliding window, block-sparse
layout, softcap, sinks, split-K). Tiles: the target's table, per kind and head_dim bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton.language as tl

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, next_power_of_2
from kiln.codegen.kernels.triton_helpers import helper
from kiln.codegen.targets import Target, TileConfig
from kiln.errors import KilnError
from kiln.ir.specs import AttentionKind, AttentionSpec, BlockSparseLayout

LOG2E = tl.constexpr(1.4426950408889634)


def _float_tag(value: float) -> str:
    """12.5 -> "12p5": a float as a cache-key fragment (letters, digits, `_` only)."""
    return f"{value:g}".replace(".", "p").replace("-", "m").replace("+", "")


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
        if spec.kind is AttentionKind.LINEAR:
            raise KilnError(f"linear attention keeps a recurrent state, not a KV cache: the paged attention kernels "
                            f"do not run it ({spec})")
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
        if self.window is not None:
            return min(context, self.window)
        layout = self.layout
        if layout is None or context == 0:
            return context
        local_block = layout.first_local_block((context - 1) // layout.block_size)
        return (local_block // layout.vertical_stride - local_block) * layout.block_size + context

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
            parts.append(f"cap{_float_tag(self.softcap)}")
        if self.scale is not None:
            parts.append(f"scale{_float_tag(self.scale)}")
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


@helper
def kv_tile_offsets(p_block_table, o_n, m_n, i_kv_head, o_d,
                    PAGE_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Element offsets [BLOCK_N, BLOCK_D] of logical tokens o_n (kv head i_kv_head) in a paged cache.

    p_block_table: the sequence's row of block_tables; cache layout [num_blocks, PAGE_SIZE,
    NUM_KV_HEADS, HEAD_DIM]. Tokens outside m_n never read the block table (its tail is padding).
    """
    b_page = tl.load(p_block_table + o_n // PAGE_SIZE, mask=m_n, other=0).to(tl.int64)
    o_slot = b_page * PAGE_SIZE + o_n % PAGE_SIZE
    return (o_slot * NUM_KV_HEADS + i_kv_head)[:, None] * HEAD_DIM + o_d[None, :]


# -- block-sparse layouts: blocks of LAYOUT_BLOCK tokens; query block i sees key block j <= i when
# i - j < LOCAL_BLOCKS or (j + 1) % VERTICAL_STRIDE == 0. A kernel visits, for its queries, the
# vertical blocks before their local range, then the local range, ceil(LAYOUT_BLOCK / BLOCK_N)
# tiles per block (fewer in the last one): one loop over the tiles `sparse_tiles` counts.


@helper
def sparse_tiles(q_first, q_last, BLOCK_N: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
                 LOCAL_BLOCKS: tl.constexpr, VERTICAL_STRIDE: tl.constexpr):
    """The KV tiles that queries at positions q_first..q_last see between them: the vertical
    blocks before local_block, then blocks local_block .. q_last's block (the local blocks of
    q_first's block up to q_last's: each is seen by some query), keys up to q_last only.
    Returns (num_tiles, vertical_blocks, local_block), scalars for `sparse_tile`.
    """
    TILES_PER_BLOCK: tl.constexpr = (LAYOUT_BLOCK + BLOCK_N - 1) // BLOCK_N
    local_block = tl.maximum(q_first // LAYOUT_BLOCK - LOCAL_BLOCKS + 1, 0)
    last_block = q_last // LAYOUT_BLOCK
    vertical_blocks = local_block // VERTICAL_STRIDE
    num_tiles = ((vertical_blocks + last_block - local_block) * TILES_PER_BLOCK
                 + tl.cdiv(q_last + 1 - last_block * LAYOUT_BLOCK, BLOCK_N))  # the last block: up to q_last
    return num_tiles, vertical_blocks, local_block


@helper
def sparse_tile(i_kv_tile, vertical_blocks, local_block, kv_end, BLOCK_N: tl.constexpr,
                LAYOUT_BLOCK: tl.constexpr, VERTICAL_STRIDE: tl.constexpr):
    """(key_block, n_start, n_stop): tile i_kv_tile of `sparse_tiles` holds keys n_start ..
    min(n_start + BLOCK_N, n_stop) - 1, all in layout block key_block (n_stop: its end, or kv_end)."""
    TILES_PER_BLOCK: tl.constexpr = (LAYOUT_BLOCK + BLOCK_N - 1) // BLOCK_N
    i_block = i_kv_tile // TILES_PER_BLOCK
    key_block = tl.where(i_block < vertical_blocks, (i_block + 1) * VERTICAL_STRIDE - 1,
                         local_block + i_block - vertical_blocks)
    n_start = key_block * LAYOUT_BLOCK + (i_kv_tile - i_block * TILES_PER_BLOCK) * BLOCK_N
    return key_block, n_start, tl.minimum(key_block * LAYOUT_BLOCK + LAYOUT_BLOCK, kv_end)


@helper
def layout_sees(q_block, k_block, LOCAL_BLOCKS: tl.constexpr, VERTICAL_STRIDE: tl.constexpr):
    """Whether query block q_block sees key block k_block <= q_block (the caller masks causality)."""
    return (q_block - k_block < LOCAL_BLOCKS) | ((k_block + 1) % VERTICAL_STRIDE == 0)


@helper
def online_softmax_step(b_s, b_v, b_max, b_sum, b_acc, DOT_PRECISION: tl.constexpr):
    """Folds one KV tile into the flash-attention state (fp32).

    b_s: [M, BLOCK_N] scores (natural units, -inf where not visible); b_v: [BLOCK_N, BLOCK_D].
    State: b_max [M] running max (log2 units), b_sum [M], b_acc [M, BLOCK_D] (unnormalised).
    A row that has seen no visible key keeps max = -inf, sum = 0, acc = 0 (no NaN).
    """
    b_s = b_s * LOG2E
    b_max_new = tl.maximum(b_max, tl.max(b_s, 1))
    b_base = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)
    b_p = tl.exp2(b_s - b_base[:, None])
    b_rescale = tl.exp2(b_max - b_base)
    b_sum = b_sum * b_rescale + tl.sum(b_p, 1)
    b_acc = b_acc * b_rescale[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_max_new, b_sum, b_acc


@helper
def softcap_scores(b_s, CAP: tl.constexpr):
    """CAP * tanh(b_s / CAP), fp32, within a few ulp of tanh everywhere (no libdevice: it does not
    run in the interpreter). |x| < 0.3: the odd Taylor series to x^11 (2^-24 below the next term);
    else (1 - e^-2|x|) / (1 + e^-2|x|), whose cancellation costs < 2 ulp there.
    """
    b_x = b_s / CAP
    b_abs = tl.abs(b_x)
    b_exp = tl.exp(-2.0 * b_abs)
    b_x2 = b_x * b_x
    b_series = b_abs * (1.0 + b_x2 * (-1.0 / 3.0 + b_x2 * (2.0 / 15.0 + b_x2 * (
        -17.0 / 315.0 + b_x2 * (62.0 / 2835.0 + b_x2 * (-1382.0 / 155925.0))))))
    b_tanh = tl.where(b_abs < 0.3, b_series, (1.0 - b_exp) / (1.0 + b_exp))
    return CAP * tl.where(b_x < 0.0, -b_tanh, b_tanh)


def check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, *, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, page_size: int | None = None) -> None:
    """k_cache, v_cache: contiguous [num_blocks, page_size, num_kv_heads, head_dim] of `dtype`
    (any page size when None)."""
    shape = (k_cache.shape[0], page_size or k_cache.shape[1], num_kv_heads, head_dim)
    strides = (shape[1] * num_kv_heads * head_dim, num_kv_heads * head_dim, head_dim, 1)
    check_layout("k_cache", k_cache, shape, strides, dtype)
    check_layout("v_cache", v_cache, shape, strides, dtype)
