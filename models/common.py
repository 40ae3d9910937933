"""What every spec reads from a Hugging Face config dict the same way: required keys (a clear
error when one is missing), rope settings, and per-layer sliding windows."""

from __future__ import annotations

import math
from typing import Callable

from kiln.errors import KilnError
from kiln.ir.specs import (
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
