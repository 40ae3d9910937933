"""IBM Granite (3.x): the Llama structure plus four scalars. Embeddings are multiplied by
`embedding_multiplier`, each residual branch (attention, MLP) by `residual_multiplier`,
attention scores are scaled by `attention_multiplier` (instead of 1/sqrt(head_dim)), and the
logits are divided by `logits_scaling`. Attention and MLP are Llama's (models/llama.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kiln.errors import KilnError
from kiln.frontend.blocks import RMSNorm
from kiln.models.common import CausalLM, DecoderModel, HFConfig, QKVAttention, attention_spec, extend_config
from kiln.models.llama import WEIGHTS, LlamaConfig, LlamaMLP


@dataclass(frozen=True)
class GraniteConfig(LlamaConfig):
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @classmethod
    def from_hf(cls, config: dict) -> GraniteConfig:
        config = HFConfig(config)
        if config.get("hidden_act", "silu") != "silu":
            raise KilnError(f"Granite with activation {config['hidden_act']!r} is not supported; kiln runs silu")
        llama = LlamaConfig.from_hf(config)
        return extend_config(
            cls, llama,
            embedding_multiplier=config["embedding_multiplier"],
            residual_multiplier=config["residual_multiplier"],
            attention_multiplier=config["attention_multiplier"],
            logits_scaling=config["logits_scaling"],
        )


class GraniteAttention(QKVAttention):
    """Llama's attention, its scores scaled by attention_multiplier."""

    def __init__(self, cfg: GraniteConfig, window: int | None):
        spec = attention_spec(cfg, window, scale=cfg.attention_multiplier)
        super().__init__(cfg, spec, cfg.rope, (cfg.qkv_bias, cfg.o_bias), cfg.qk_norm)


class GraniteDecoderLayer(nn.Module):
    def __init__(self, cfg: GraniteConfig, window: int | None):
        super().__init__()
        self.residual_multiplier = cfg.residual_multiplier
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GraniteAttention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, positions, h):
        h = h + self.self_attn(positions, self.input_layernorm(h)) * self.residual_multiplier
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_multiplier


class GraniteForCausalLM(CausalLM):
    CONFIG = GraniteConfig
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: GraniteConfig):
        layers = (GraniteDecoderLayer(cfg, w) for w in cfg.sliding_windows)
        super().__init__(cfg, DecoderModel(cfg, layers, embed_scale=cfg.embedding_multiplier))

    def forward(self, input_ids, positions):
        return super().forward(input_ids, positions) / self.config.logits_scaling
