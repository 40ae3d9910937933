"""The Llama family: Llama 2/3 (llama3 rope scaling), SmolLM2, Mistral (sliding window),
Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm). Members differ only by config; rope settings
(any type models/common.py reads: yarn, longrope, dynamic, ...) too.

Module names follow Hugging Face's so that checkpoints map by name; q/k/v and gate/up are
packed into one projection each (see WEIGHTS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from kiln.frontend.blocks import Attention, Embedding, LastTokens, Linear, RMSNorm, Rope
from kiln.frontend.weights import Concat
from kiln.ir.specs import AttentionKind, AttentionSpec, RopeSpec
from kiln.models.common import HFConfig, head_dim, rope_parameters, rope_spec, served_max_position, sliding_windows

WEIGHTS = (
    Concat("model.layers.*.self_attn.qkv_proj.weight",
           ("model.layers.*.self_attn.q_proj.weight", "model.layers.*.self_attn.k_proj.weight",
            "model.layers.*.self_attn.v_proj.weight")),
    Concat("model.layers.*.self_attn.qkv_proj.bias",
           ("model.layers.*.self_attn.q_proj.bias", "model.layers.*.self_attn.k_proj.bias",
            "model.layers.*.self_attn.v_proj.bias")),
    Concat("model.layers.*.mlp.gate_up_proj.weight",
           ("model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight")),
)


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


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, window: int | None):
        super().__init__()
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.rope = Rope(cfg.rope)
        kind = AttentionKind.DENSE if window is None else AttentionKind.SLIDING_WINDOW
        self.attn = Attention(AttentionSpec(kind, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, window=window))

    def forward(self, positions, x):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, positions), self.rope(k, positions)
        return self.o_proj(self.attn(q, k, v).flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, window: int | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, positions, h):
        h = h + self.self_attn(positions, self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, w) for w in cfg.sliding_windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(positions, h)
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.last_tokens = LastTokens()
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_hf_config(cls, config: dict) -> LlamaForCausalLM:
        return cls(LlamaConfig.from_hf(config))

    def forward(self, input_ids, positions):
        return self.lm_head(self.last_tokens(self.model(input_ids, positions)))
