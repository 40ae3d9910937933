"""The Gemma family from Gemma 2 on: Gemma 2 and Gemma 3 (text). Members differ only by config.

Both: embeddings scaled by sqrt(hidden_size); RMSNorms that scale by `1 + w` (the loader adds
the 1, see WEIGHTS); a norm before and after both attention and MLP; a GELU-tanh gated MLP;
attention scaled by query_pre_attn_scalar^-1/2; sliding-window and full layers (`layer_types`).
Gemma 2 soft-caps attention scores and final logits. Gemma 3 RMS-normalizes each head of q and
k and gives sliding layers their own rope base (`rope_local_base_freq`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.frontend.blocks import Linear, RMSNorm
from kiln.frontend.weights import AddConstant
from kiln.ir.specs import RopeSpec
from kiln.models.common import (
    PACKED_QKV_GATE_UP,
    CausalLM,
    DecoderModel,
    HFConfig,
    QKVAttention,
    attention_spec,
    head_dim,
    rope_parameters,
    rope_spec,
    served_max_position,
)

_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
          "self_attn.q_norm", "self_attn.k_norm")
WEIGHTS = PACKED_QKV_GATE_UP + (
    AddConstant(tuple(f"model.layers.*.{n}.weight" for n in _NORMS) + ("model.norm.weight",), 1.0),
)


@dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    query_pre_attn_scalar: float
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    ropes: tuple[RopeSpec, ...]  # per layer
    qk_norm: bool = False  # Gemma 3
    attention_bias: bool = False
    attn_softcap: float | None = None  # Gemma 2
    final_softcap: float | None = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, config: dict) -> GemmaConfig:
        config = HFConfig(config)
        gemma3 = config["architectures"][0] == "Gemma3ForCausalLM"
        if config.get("use_bidirectional_attention"):
            raise KilnError("this Gemma checkpoint uses bidirectional attention (an embedding model); kiln runs "
                            "causal language models only")
        activation = config.get("hidden_activation") or config.get("hidden_act", "gelu_pytorch_tanh")
        if activation != "gelu_pytorch_tanh":
            raise KilnError(f"Gemma with activation {activation!r} is not supported; kiln runs gelu_pytorch_tanh")
        layers, hd = config["num_hidden_layers"], head_dim(config)
        types = config.get("layer_types") or _default_layer_types(config, layers, gemma3)
        ropes = tuple(_rope(config, hd, t, gemma3) for t in types)
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=hd,
            rms_norm_eps=config["rms_norm_eps"],
            query_pre_attn_scalar=config["query_pre_attn_scalar"],
            sliding_windows=tuple(config["sliding_window"] if t == "sliding_attention" else None for t in types),
            ropes=ropes,
            qk_norm=gemma3,
            attention_bias=bool(config.get("attention_bias", False)),
            attn_softcap=None if gemma3 else config.get("attn_logit_softcapping"),  # Gemma 3 ignores it
            final_softcap=config.get("final_logit_softcapping"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            max_position_embeddings=min(served_max_position(config, r) for r in ropes),
        )


def _default_layer_types(config: HFConfig, layers: int, gemma3: bool) -> list[str]:
    """transformers' default: Gemma 3 has one full layer every `sliding_window_pattern` (6),
    Gemma 2 alternates sliding and full."""
    pattern = (config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6) if gemma3 else 2
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def _rope(config: HFConfig, hd: int, layer_type: str, gemma3: bool) -> RopeSpec:
    """transformers 5 nests Gemma 3's rope settings by layer type; transformers 4 wrote
    `rope_local_base_freq` for sliding layers and `rope_theta` + `rope_scaling` for full ones."""
    nested = layer_type in (config.get("rope_parameters") or {})
    if not gemma3 or nested:
        return rope_spec(config, rope_parameters(config, layer_type), hd)
    if layer_type == "sliding_attention":
        return RopeSpec(hd, config.get("rope_local_base_freq", 10000.0))
    return rope_spec(config, dict(config.get("rope_scaling") or {}), hd, default_theta=1_000_000.0)


class GemmaAttention(QKVAttention):
    """Scores scaled by query_pre_attn_scalar^-1/2 and soft-capped (Gemma 2); each layer its own rope."""

    def __init__(self, cfg: GemmaConfig, layer: int):
        spec = attention_spec(cfg, cfg.sliding_windows[layer], scale=cfg.query_pre_attn_scalar**-0.5,
                              softcap=cfg.attn_softcap)
        super().__init__(cfg, spec, cfg.ropes[layer], (cfg.attention_bias, cfg.attention_bias), cfg.qk_norm)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GemmaAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GemmaMLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, h):
        h = h + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(h)))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaForCausalLM(CausalLM):
    CONFIG = GemmaConfig
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: GemmaConfig):
        layers = (GemmaDecoderLayer(cfg, i) for i in range(len(cfg.sliding_windows)))
        # embeddings times sqrt(hidden_size): transformers rounds it to the activation dtype, as a const does
        super().__init__(cfg, DecoderModel(cfg, layers, embed_scale=cfg.hidden_size**0.5))

    def forward(self, input_ids, positions):
        logits = super().forward(input_ids, positions)
        if self.config.final_softcap is not None:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits
