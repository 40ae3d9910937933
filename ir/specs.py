"""Frozen variant descriptions carried as node attributes: attention variants and rotary embedding.

They are plain data: the frontend fills them in from a model spec, passes read them to choose
kernels, and the interpreter reads them to run the reference semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch


class AttentionKind(str, Enum):
    DENSE = "dense"
    SLIDING_WINDOW = "sliding_window"  # dense, restricted to the last `window` keys
    BLOCK_SPARSE = "block_sparse"  # attends to the key blocks a BlockSparseLayout allows
    LINEAR = "linear"  # recurrent state instead of a KV cache


@dataclass(frozen=True)
class KVLayout:
    """How a layer's K/V are stored: paged blocks of `block_size` tokens,
    k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim]."""

    block_size: int = 16


@dataclass(frozen=True)
class BlockSparseLayout:
    """Strided block sparsity (Sparse Transformer style): query block i sees the `local_blocks`
    key blocks before it and every key block j with (j + 1) % vertical_stride == 0."""

    block_size: int
    local_blocks: int
    vertical_stride: int


@dataclass(frozen=True)
class LinearAttentionSpec:
    """A recurrent (linear-attention) layer: its state lives in the state pool, not the KV cache.
    `rule` names the recurrence (e.g. "gla", "delta"); `state_shape` is per sequence."""

    rule: str
    state_shape: tuple[int, ...]


@dataclass(frozen=True)
class AttentionSpec:
    """One attention layer's variant. Shapes: q [T, num_heads, head_dim], k/v [T, num_kv_heads, head_dim]."""

    kind: AttentionKind
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool = True
    scale: float | None = None  # None: 1/sqrt(head_dim)
    window: int | None = None  # sliding window: a query at p sees keys at positions > p - window
    softcap: float | None = None  # scores = softcap * tanh(scores / softcap)
    sinks: bool = False  # a learned per-head sink logit joins the softmax denominator
    block_sparse: BlockSparseLayout | None = None
    linear: LinearAttentionSpec | None = None
    kv_layout: KVLayout = KVLayout()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        needs = {
            AttentionKind.SLIDING_WINDOW: ("window", self.window),
            AttentionKind.BLOCK_SPARSE: ("block_sparse", self.block_sparse),
            AttentionKind.LINEAR: ("linear", self.linear),
        }
        if self.kind in needs and needs[self.kind][1] is None:
            raise ValueError(f"{self.kind.value} attention needs `{needs[self.kind][0]}`")

    @property
    def effective_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def __str__(self) -> str:
        parts = [f"h={self.num_heads}", f"kv={self.num_kv_heads}", f"d={self.head_dim}"]
        parts += ["causal"] if self.causal else []
        parts += [f"window={self.window}"] if self.window is not None else []
        parts += [f"scale={self.scale:g}"] if self.scale is not None else []
        parts += [f"softcap={self.softcap:g}"] if self.softcap is not None else []
        parts += ["sinks"] if self.sinks else []
        parts += [f"block={self.kv_layout.block_size}"]
        return f"{self.kind.value}({', '.join(parts)})"


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling. kind "linear": positions divided by factor; kind "llama3":
    Llama 3.1's wavelength-dependent scaling."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding in the rotate-half (NeoX / HF Llama) layout over the first `rotary_dim`
    channels of each head (all of them when None)."""

    head_dim: int
    theta: float
    rotary_dim: int | None = None
    scaling: RopeScaling | None = None

    def __post_init__(self):
        if self.scaling is not None and self.scaling.kind not in _SCALINGS:
            raise ValueError(f"unknown rope scaling {self.scaling.kind!r}; known: {sorted(_SCALINGS)}")

    @property
    def dim(self) -> int:
        return self.rotary_dim or self.head_dim

    def inv_freq(self) -> torch.Tensor:
        """fp32 [dim/2]: angle_i(position) = position * inv_freq[i] (computed as HF does)."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).to(torch.float32) / self.dim
        inv_freq = 1.0 / (self.theta**exponents)
        return inv_freq if self.scaling is None else _SCALINGS[self.scaling.kind](inv_freq, self.scaling)

    def __str__(self) -> str:
        scaling = f", {self.scaling.kind}x{self.scaling.factor:g}" if self.scaling else ""
        rotary = f", rotary={self.rotary_dim}" if self.rotary_dim else ""
        return f"rope(d={self.head_dim}, theta={self.theta:g}{rotary}{scaling})"


def _linear_scaling(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    return inv_freq / s.factor


def _llama3_scaling(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


_SCALINGS = {"linear": _linear_scaling, "llama3": _llama3_scaling}
