"""Phi-3 (and Phi-3.5 / Phi-4-mini, same architecture): a Llama-shaped decoder whose checkpoint
already packs q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, with optional partial
rotary embedding and LongRoPE ("su"/"longrope") scaling.

LongRoPE: kiln uses the short factors, which transformers uses for sequences up to
`original_max_position_embeddings`; beyond it transformers switches to the long factors, so kiln
serves at most that many tokens (`max_position_embeddings` is capped there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.frontend.blocks import Attention, Embedding, LastTokens, Linear, RMSNorm, Rope
from kiln.ir.specs import AttentionKind, AttentionSpec, RopeSpec
from kiln.models.common import (HFConfig, head_dim, rope_parameters, rope_spec, served_max_position,
                                sliding_windows)

WEIGHTS = ()  # the checkpoint's names and packing are the spec's


@dataclass(frozen=True)
class Phi3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf(cls, config: dict) -> Phi3Config:
        config = HFConfig(config)
        if config.get("hidden_act", "silu") != "silu":
            raise KilnError(f"Phi-3 with activation {config['hidden_act']!r} is not supported; kiln runs silu")
        hd = head_dim(config)
        params = rope_parameters(config)
        if params.get("rope_type", params.get("type")) == "yarn":  # transformers reads Phi-3's "yarn" as longrope
            params["rope_type"] = "longrope"
        rope = rope_spec(config, params, hd)
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=hd,
            rms_norm_eps=config["rms_norm_eps"],
            rope=rope,
            sliding_windows=sliding_windows(config, config["num_hidden_layers"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=served_max_position(config, rope),
        )


class Phi3Attention(nn.Module):
    def __init__(self, cfg: Phi3Config, window: int | None):
        super().__init__()
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.rope = Rope(cfg.rope)
        kind = AttentionKind.DENSE if window is None else AttentionKind.SLIDING_WINDOW
        self.attn = Attention(AttentionSpec(kind, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, window=window))

    def forward(self, positions, x):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rope(q, positions), self.rope(k, positions)
        return self.o_proj(self.attn(q, k, v).flatten(1))


class Phi3MLP(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, cfg: Phi3Config, window: int | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Phi3Attention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Phi3MLP(cfg)

    def forward(self, positions, h):
        h = h + self.self_attn(positions, self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi3Model(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Phi3DecoderLayer(cfg, w) for w in cfg.sliding_windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(positions, h)
        return self.norm(h)


class Phi3ForCausalLM(nn.Module):
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.config = cfg
        self.model = Phi3Model(cfg)
        self.last_tokens = LastTokens()
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_hf_config(cls, config: dict) -> Phi3ForCausalLM:
        return cls(Phi3Config.from_hf(config))

    def forward(self, input_ids, positions):
        return self.lm_head(self.last_tokens(self.model(input_ids, positions)))
