"""IBM Granite (3.x): the Llama structure plus four scalars. Embeddings are multiplied by
`embedding_multiplier`, each residual branch (attention, MLP) by `residual_multiplier`,
attention scores are scaled by `attention_multiplier` (instead of 1/sqrt(head_dim)), and the
logits are divided by `logits_scaling`. Attention and MLP are Llama's (models/llama.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from kiln.errors import KilnError
from kiln.frontend.blocks import Attention, Embedding, LastTokens, Linear, RMSNorm
from kiln.models.common import HFConfig
from kiln.models.llama import WEIGHTS, LlamaAttention, LlamaConfig, LlamaMLP


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
        return cls(
            **{f.name: getattr(llama, f.name) for f in dataclasses.fields(LlamaConfig)},
            embedding_multiplier=config["embedding_multiplier"],
            residual_multiplier=config["residual_multiplier"],
            attention_multiplier=config["attention_multiplier"],
            logits_scaling=config["logits_scaling"],
        )


class GraniteAttention(LlamaAttention):
    """Llama's attention, its scores scaled by attention_multiplier."""

    def __init__(self, cfg: GraniteConfig, window: int | None):
        super().__init__(cfg, window)
        self.attn = Attention(dataclasses.replace(self.attn.spec, scale=cfg.attention_multiplier))


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


class GraniteModel(nn.Module):
    def __init__(self, cfg: GraniteConfig):
        super().__init__()
        self.embedding_multiplier = cfg.embedding_multiplier
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GraniteDecoderLayer(cfg, w) for w in cfg.sliding_windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions):
        h = self.embed_tokens(input_ids) * self.embedding_multiplier
        for layer in self.layers:
            h = layer(positions, h)
        return self.norm(h)


class GraniteForCausalLM(nn.Module):
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: GraniteConfig):
        super().__init__()
        self.config = cfg
        self.model = GraniteModel(cfg)
        self.last_tokens = LastTokens()
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_hf_config(cls, config: dict) -> GraniteForCausalLM:
        return cls(GraniteConfig.from_hf(config))

    def forward(self, input_ids, positions):
        return self.lm_head(self.last_tokens(self.model(input_ids, positions))) / self.config.logits_scaling
