"""What every spec shares: reading a Hugging Face config dict (required keys with a clear error
when one is missing, rope settings, per-layer sliding windows), and the scaffolding around the
decoder layers (`DecoderModel`: embed_tokens -> layers -> norm; `CausalLM`: model -> last
tokens -> lm_head) and the attention most families share (`QKVAttention`), named as Hugging
Face names them so that checkpoints map by name."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import ClassVar

from torch import nn

from kiln.errors import KilnError
from kiln.frontend.blocks import Attention, Embedding, LastTokens, Linear, RMSNorm, Rope
from kiln.frontend.weights import Concat
from kiln.ir.specs import (
    AttentionKind,
    AttentionSpec,
    DynamicScaling,
    LinearScaling,
    Llama3Scaling,
    LongRopeScaling,
    RopeScaling,
    RopeSpec,
    YarnScaling,
)


class HFConfig(dict):
    """An HF config dict (or one of its sub-dicts, named by `where`) whose missing required keys
    (`config["key"]`) raise a KilnError that says what to do; `get` works as for any dict."""

    def __init__(self, data: dict, where: str = "config.json"):
        super().__init__(data)
        self.where = where

    def __missing__(self, key):
        raise KilnError(f"{self.where} has no {key!r}, which kiln needs to build this model: add it (the "
                        "transformers config class of the architecture documents it) or re-export the checkpoint "
                        "with transformers")


def head_dim(config: HFConfig) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


# ---- rope


def rope_parameters(config: HFConfig, layer_type: str | None = None) -> dict:
    """The rope settings of one layer type as one flat dict: transformers 5's `rope_parameters`
    (flat, or nested by layer type), or transformers 4's `rope_scaling` + top-level `rope_theta`."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    return dict(params)


def rope_spec(config: HFConfig, params: dict, head_size: int, default_theta: float = 10000.0) -> RopeSpec:
    """The RopeSpec for one rope settings dict (see `rope_parameters`). Raises KilnError for a
    rope type kiln does not know."""
    theta = params.get("rope_theta", config.get("rope_theta", default_theta))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    dim = int(head_size * partial)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _SCALINGS:
        raise KilnError(f"rope type {kind!r} is not supported yet; kiln supports: {', '.join(sorted(_SCALINGS))}")
    scaling = _SCALINGS[kind](config, HFConfig(params, f"config.json's rope settings ({kind})"))
    return RopeSpec(head_size, theta, dim if dim != head_size else None, scaling)


def served_max_position(config: HFConfig, rope: RopeSpec) -> int:
    """The longest context kiln serves: `max_position_embeddings`, capped where kiln's rope
    matches transformers only for shorter contexts (LongRoPE: its short factors)."""
    longest = config.get("max_position_embeddings", 4096)
    if isinstance(rope.scaling, LongRopeScaling):
        return min(longest, rope.scaling.original_max_position)
    return longest


def _original_max_position(config: HFConfig, params: dict) -> int:
    """As transformers' `standardize_rope_params`: a top-level `original_max_position_embeddings`
    (Phi-3) wins, then the rope dict's, then `max_position_embeddings`."""
    return int(config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
               or config["max_position_embeddings"])


def _yarn(config: HFConfig, params: HFConfig) -> YarnScaling:
    original = _original_max_position(config, params)
    factor = params["factor"] or config["max_position_embeddings"] / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    return YarnScaling(factor=factor, original_max_position=original, attention=attention,
                       beta_fast=params.get("beta_fast") or 32, beta_slow=params.get("beta_slow") or 1,
                       truncate=params.get("truncate", True))


def _longrope(config: HFConfig, params: HFConfig) -> LongRopeScaling:
    original = _original_max_position(config, params)
    factor = params.get("factor") or config["max_position_embeddings"] / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return LongRopeScaling(short_factor=tuple(float(f) for f in params["short_factor"]),
                           long_factor=tuple(float(f) for f in params["long_factor"]),
                           original_max_position=original, attention=attention)


_SCALINGS: dict[str, Callable[[HFConfig, HFConfig], RopeScaling | None]] = {
    "default": lambda config, params: None,
    "linear": lambda config, params: LinearScaling(params["factor"]),
    "llama3": lambda config, params: Llama3Scaling(
        factor=params["factor"], low_freq_factor=params["low_freq_factor"], high_freq_factor=params["high_freq_factor"],
        original_max_position=int(params.get("original_max_position_embeddings") or config["max_position_embeddings"])),
    "yarn": _yarn,
    "longrope": _longrope,
    "su": _longrope,  # Phi-3's first name for longrope
    "dynamic": lambda config, params: DynamicScaling(params["factor"], config["max_position_embeddings"]),
}


# ---- attention layers


def sliding_windows(config: HFConfig, layers: int) -> tuple[int | None, ...]:
    """Per layer, the sliding window (None: full attention): from `layer_types` when the config
    has them, else one window for every layer when `sliding_window` is set and enabled."""
    window = config.get("sliding_window")
    if config.get("layer_types"):
        return tuple(window if t == "sliding_attention" else None for t in config["layer_types"])
    if window and config.get("use_sliding_window", True):
        return (window,) * layers
    return (None,) * layers


# ---- model scaffolding


def attention_spec(cfg, window: int | None, scale: float | None = None,
                   softcap: float | None = None) -> AttentionSpec:
    """Causal attention over cfg's heads (num_heads, num_kv_heads, head_dim): dense where
    `window` is None, else sliding-window. `scale`: None for 1/sqrt(head_dim)."""
    kind = AttentionKind.DENSE if window is None else AttentionKind.SLIDING_WINDOW
    return AttentionSpec(kind, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, window=window, scale=scale,
                         softcap=softcap)


# the loader rules that pack an HF checkpoint's q/k/v and gate/up projections into QKVAttention's
# `qkv_proj` and a gated MLP's `gate_up_proj`
PACKED_QKV_GATE_UP = (
    Concat("model.layers.*.self_attn.qkv_proj.weight",
           ("model.layers.*.self_attn.q_proj.weight", "model.layers.*.self_attn.k_proj.weight",
            "model.layers.*.self_attn.v_proj.weight")),
    Concat("model.layers.*.self_attn.qkv_proj.bias",
           ("model.layers.*.self_attn.q_proj.bias", "model.layers.*.self_attn.k_proj.bias",
            "model.layers.*.self_attn.v_proj.bias")),
    Concat("model.layers.*.mlp.gate_up_proj.weight",
           ("model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight")),
)


class QKVAttention(nn.Module):
    """HF's `self_attn` as kiln packs it: q, k, v from one projection `qkv_proj` (the loader
    packs q_proj/k_proj/v_proj, see PACKED_QKV_GATE_UP), each head of q and k RMS-normalized when
    `qk_norm` (`q_norm`, `k_norm`), rope, attention as `spec` says, `o_proj`. `cfg` gives
    hidden_size and rms_norm_eps; `bias`: whether qkv_proj and o_proj have one."""

    def __init__(self, cfg, spec: AttentionSpec, rope: RopeSpec, bias: tuple[bool, bool], qk_norm: bool):
        super().__init__()
        self.q_size, self.kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias[0])
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=bias[1])
        if qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, cfg.rms_norm_eps)
        self.rope = Rope(rope)
        self.attn = Attention(spec)

    def forward(self, positions, x):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, positions), self.rope(k, positions)
        return self.o_proj(self.attn(q, k, v).flatten(1))


class PreNormDecoderLayer(nn.Module):
    """HF's pre-norm decoder layer: h + self_attn(input_layernorm(h)), then + the MLP of
    post_attention_layernorm(h). `mlp_name`: the MLP's module name in the checkpoint (HF's: "mlp",
    Mixtral's "block_sparse_moe"). `cfg` gives hidden_size and rms_norm_eps."""

    def __init__(self, cfg, self_attn: nn.Module, mlp: nn.Module, mlp_name: str = "mlp"):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp_name = mlp_name
        self.add_module(mlp_name, mlp)

    def forward(self, positions, h):
        h = h + self.self_attn(positions, self.input_layernorm(h))
        return h + getattr(self, self.mlp_name)(self.post_attention_layernorm(h))


def extend_config(cls, base, **fields):
    """An instance of config dataclass `cls` (a subclass of `base`'s class) holding every field of
    `base` and `fields`: a family's config built on a parent family's `from_hf`."""
    return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, **fields)


class DecoderModel(nn.Module):
    """HF's `model.*`: embed_tokens -> the decoder layers -> norm. `embed_scale`: a constant the
    embeddings are multiplied by (Gemma, Granite), None for none. `cfg` needs vocab_size,
    hidden_size, rms_norm_eps."""

    def __init__(self, cfg, layers: Iterable[nn.Module], embed_scale: float | None = None):
        super().__init__()
        self.embed_scale = embed_scale
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions):
        h = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        for layer in self.layers:
            h = layer(positions, h)
        return self.norm(h)


class CausalLM(nn.Module):
    """A spec: `model` (a DecoderModel) -> the last token of each sequence -> `lm_head`, tied to
    the embeddings when the config says. A family subclasses it, sets CONFIG (a config class
    with `from_hf(dict)`) and WEIGHTS (its loader rules), and builds its DecoderModel; one that
    post-processes logits (soft-capping, scaling) extends `forward`."""

    CONFIG: ClassVar[type]
    WEIGHTS: ClassVar[tuple] = ()

    def __init__(self, cfg, model: DecoderModel):
        super().__init__()
        self.config = cfg
        self.model = model
        self.last_tokens = LastTokens()
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_hf_config(cls, config: dict) -> CausalLM:
        return cls(cls.CONFIG.from_hf(config))

    def forward(self, input_ids, positions):
        return self.lm_head(self.last_tokens(self.model(input_ids, positions)))
