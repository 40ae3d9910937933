"""The Llama family: Llama 2/3 (llama3 rope scaling), SmolLM2, Mistral (sliding window),
Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm). Members differ only by config; rope settings
(any type models/common.py reads: yarn, longrope, dynamic, ...) too.

Module names follow Hugging Face's so that checkpoints map by name; q/k/v and gate/up are
packed into one projection each (see WEIGHTS).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from kiln.frontend.blocks import Linear
from kiln.ir.specs import RopeSpec
from kiln.models.common import (
    PACKED_QKV_GATE_UP,
    CausalLM,
    DecoderModel,
    HFConfig,
    PreNormDecoderLayer,
    QKVAttention,
    attention_spec,
    head_dim,
    rope_parameters,
    rope_spec,
    served_max_position,
    sliding_windows,
)

WEIGHTS = PACKED_QKV_GATE_UP


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama and Qwen3: attention_bias also covers o_proj (Qwen2: never)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    tie_word_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf(cls, config: dict) -> LlamaConfig:
        config = HFConfig(config)
        arch = config["architectures"][0]
        heads = config["num_attention_heads"]
        hd = head_dim(config)
        rope = rope_spec(config, rope_parameters(config), hd)
        attention_bias = bool(config.get("attention_bias", False))
        layers = config["num_hidden_layers"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=hd,
            rms_norm_eps=config["rms_norm_eps"],
            rope=rope,
            qkv_bias=attention_bias or arch == "Qwen2ForCausalLM",
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            sliding_windows=sliding_windows(config, layers),
            max_position_embeddings=served_max_position(config, rope),
        )


class LlamaAttention(QKVAttention):
    def __init__(self, cfg: LlamaConfig, window: int | None):
        super().__init__(cfg, attention_spec(cfg, window), cfg.rope, (cfg.qkv_bias, cfg.o_bias), cfg.qk_norm)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def llama_layers(cfg: LlamaConfig) -> Iterator[PreNormDecoderLayer]:
    """Llama's decoder layers: pre-norm, attention with each layer's window, the gated MLP."""
    return (PreNormDecoderLayer(cfg, LlamaAttention(cfg, w), LlamaMLP(cfg)) for w in cfg.sliding_windows)


class LlamaForCausalLM(CausalLM):
    CONFIG = LlamaConfig
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg, DecoderModel(cfg, llama_layers(cfg)))
