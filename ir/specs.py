"""Frozen variant descriptions carried as node attributes: attention variants and rotary embedding.

They are plain data: the frontend fills them in from a model spec, passes read them to choose
kernels, and the interpreter reads them to run the reference semantics.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch

from kiln.contract import BlockSparseLayout


class AttentionKind(str, Enum):
    DENSE = "dense"
    SLIDING_WINDOW = "sliding_window"  # dense, restricted to the last `window` keys
    BLOCK_SPARSE = "block_sparse"  # attends to the key blocks a BlockSparseLayout allows


@dataclass(frozen=True)
class KVLayout:
    """How a layer's K/V are stored: paged blocks of `block_size` tokens,
    k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim]."""

    block_size: int = 16


@dataclass(frozen=True)
class LinearAttentionSpec:
    """A recurrent (linear-attention) layer: its state lives in the state pool, not the KV cache.

    `rule` names the recurrence in ir/linear_rules.RULES (the gated delta rule of Gated DeltaNet,
    or the gated rule of Mamba2's SSD). Shapes: q, k [T, num_k_heads, head_k_dim], v [T,
    num_v_heads, head_v_dim], each q/k head serving num_v_heads / num_k_heads consecutive value
    heads; per sequence, an fp32 state [num_v_heads, head_k_dim, head_v_dim]. Before the
    recurrence, q and k are L2-normalized per head when `qk_l2norm` and q is scaled by `scale`
    (None: head_k_dim^-1/2)."""

    rule: str
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    scale: float | None = None
    qk_l2norm: bool = False

    def __post_init__(self):
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"num_v_heads={self.num_v_heads} is not a multiple of num_k_heads={self.num_k_heads}")

    @property
    def effective_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_k_dim ** -0.5

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (self.num_v_heads, self.head_k_dim, self.head_v_dim)

    def __str__(self) -> str:
        parts = [f"hk={self.num_k_heads}", f"hv={self.num_v_heads}", f"dk={self.head_k_dim}", f"dv={self.head_v_dim}"]
        parts += [f"scale={self.scale:g}"] if self.scale is not None else []
        parts += ["qk_l2norm"] if self.qk_l2norm else []
        return f"{self.rule}({', '.join(parts)})"


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
    kv_layout: KVLayout = KVLayout()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        needs = {
            AttentionKind.SLIDING_WINDOW: ("window", self.window),
            AttentionKind.BLOCK_SPARSE: ("block_sparse", self.block_sparse),
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
class RopeScaling(abc.ABC):
    """A rotary frequency scaling: one small frozen dataclass per rope type (`kind`), each computing
    its inv_freq exactly as transformers' `ROPE_INIT_FUNCTIONS[kind]` does for contexts kiln serves.
    `attention_factor` (YaRN's and LongRoPE's "mscale") multiplies cos and sin, as in transformers:
    the rope op itself applies it (ir/reference.rope, the cpu table, the row kernel)."""

    kind: ClassVar[str] = ""

    @abc.abstractmethod
    def inv_freq(self, spec: RopeSpec) -> torch.Tensor:
        """fp32 [spec.dim / 2]: each rotary pair's frequency."""

    @property
    def attention_factor(self) -> float:
        return 1.0


@dataclass(frozen=True)
class LinearScaling(RopeScaling):
    """Positions divided by `factor` (position interpolation)."""

    factor: float
    kind: ClassVar[str] = "linear"

    def inv_freq(self, spec: RopeSpec) -> torch.Tensor:
        return _default_inv_freq(spec.theta, spec.dim) / self.factor

    def __str__(self) -> str:
        return f"linear x{self.factor:g}"


@dataclass(frozen=True)
class Llama3Scaling(RopeScaling):
    """Llama 3.1's wavelength-dependent scaling: long wavelengths divided by `factor`, short ones
    kept, a smooth blend between."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    kind: ClassVar[str] = "llama3"

    def inv_freq(self, spec: RopeSpec) -> torch.Tensor:
        inv_freq = _default_inv_freq(spec.theta, spec.dim)
        low_freq_wavelen = self.original_max_position / self.low_freq_factor
        high_freq_wavelen = self.original_max_position / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)

    def __str__(self) -> str:
        return f"llama3 x{self.factor:g} orig={self.original_max_position}"


@dataclass(frozen=True)
class YarnScaling(RopeScaling):
    """YaRN: per frequency, a ramp between interpolated (inv_freq / factor, long wavelengths) and
    extrapolated (unchanged, short wavelengths) frequencies; the ramp spans the dims whose
    rotation count over `original_max_position` tokens lies between beta_slow and beta_fast.
    `attention` is the resolved attention factor (transformers' default: 0.1 ln(factor) + 1)."""

    factor: float
    original_max_position: int
    attention: float
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    kind: ClassVar[str] = "yarn"

    def inv_freq(self, spec: RopeSpec) -> torch.Tensor:
        dim, base = spec.dim, spec.theta

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(self.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
        extrapolation = 1 - ramp
        return 1.0 / (self.factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation

    @property
    def attention_factor(self) -> float:
        return self.attention

    def __str__(self) -> str:
        return f"yarn x{self.factor:g} orig={self.original_max_position} attn={self.attention:.6g}"


@dataclass(frozen=True)
class LongRopeScaling(RopeScaling):
    """LongRoPE (Phi-3 "su"/"longrope"): inv_freq[i] divided by a per-frequency factor. kiln uses
    `short_factor`, which transformers uses while a sequence fits in `original_max_position`
    tokens; it switches to `long_factor` beyond, so kiln serves at most `original_max_position`
    tokens (a spec caps its max_position_embeddings there). `attention` is the resolved
    attention factor, applied at every length."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position: int
    attention: float
    kind: ClassVar[str] = "longrope"

    def inv_freq(self, spec: RopeSpec) -> torch.Tensor:
        if len(self.short_factor) != spec.dim // 2:
            raise ValueError(f"longrope has {len(self.short_factor)} short factors; rotating {spec.dim} dims needs "
                             f"{spec.dim // 2}")
        exponents = torch.arange(0, spec.dim, 2, dtype=torch.int64).float() / spec.dim
        return 1.0 / (torch.tensor(self.short_factor, dtype=torch.float32) * spec.theta**exponents)

    @property
    def attention_factor(self) -> float:
        return self.attention

    def __str__(self) -> str:
        return f"longrope orig={self.original_max_position} attn={self.attention:.6g}"


@dataclass(frozen=True)
class DynamicScaling(RopeScaling):
    """Dynamic NTK: transformers raises the base only once a sequence grows past
    `max_position` tokens. kiln serves at most `max_position` tokens, where the frequencies are
    transformers' initial ones (the base times ~1, computed by the same formula)."""

    factor: float
    max_position: int
    kind: ClassVar[str] = "dynamic"

    def inv_freq(self, spec: RopeSpec) -> torch.Tensor:
        seq_len, dim = self.max_position, spec.dim
        base = spec.theta * ((self.factor * seq_len / self.max_position) - (self.factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim)

    def __str__(self) -> str:
        return f"dynamic x{self.factor:g} max={self.max_position}"


ROPE_SCALINGS: dict[str, type[RopeScaling]] = {
    s.kind: s for s in (LinearScaling, Llama3Scaling, YarnScaling, LongRopeScaling, DynamicScaling)
}


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (theta**exponents)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding in the rotate-half (NeoX / HF Llama) layout over the first `rotary_dim`
    channels of each head (all of them when None), with an optional frequency scaling."""

    head_dim: int
    theta: float
    rotary_dim: int | None = None
    scaling: RopeScaling | None = None

    def __post_init__(self):
        if self.scaling is not None and not isinstance(self.scaling, RopeScaling):
            raise ValueError(f"rope scaling must be one of {sorted(ROPE_SCALINGS)}, got {self.scaling!r}")

    @property
    def dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def attention_factor(self) -> float:
        """The constant transformers multiplies cos and sin by (1.0 but for YaRN and LongRoPE)."""
        return 1.0 if self.scaling is None else self.scaling.attention_factor

    def inv_freq(self) -> torch.Tensor:
        """fp32 [dim/2]: angle_i(position) = position * inv_freq[i] (computed as HF does)."""
        return _default_inv_freq(self.theta, self.dim) if self.scaling is None else self.scaling.inv_freq(self)

    def __str__(self) -> str:
        scaling = f", {self.scaling}" if self.scaling else ""
        rotary = f", rotary={self.rotary_dim}" if self.rotary_dim else ""
        return f"rope(d={self.head_dim}, theta={self.theta:g}{rotary}{scaling})"
