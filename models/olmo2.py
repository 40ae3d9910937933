"""AI2's OLMo 2: the Llama structure with norms moved. Each block's output is normalized before
it joins the residual stream (post_attention_layernorm, post_feedforward_layernorm; no norm on
the block inputs), and q and k are RMS-normalized over their WHOLE projection (num_heads *
head_dim channels, before the split into heads). Its config is Llama's (LlamaConfig), its MLP
is Llama's.
"""

from __future__ import annotations

from torch import nn

from kiln.frontend.blocks import Attention, Embedding, LastTokens, Linear, RMSNorm, Rope
from kiln.ir.specs import AttentionKind, AttentionSpec
from kiln.models.llama import WEIGHTS, LlamaConfig, LlamaMLP


class Olmo2Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, window: int | None):
        super().__init__()
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.q_size, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.kv_size, cfg.rms_norm_eps)
        self.rope = Rope(cfg.rope)
        kind = AttentionKind.DENSE if window is None else AttentionKind.SLIDING_WINDOW
        self.attn = Attention(AttentionSpec(kind, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, window=window))

    def forward(self, positions, x):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q).view(-1, self.num_heads, self.head_dim)
        k = self.k_norm(k).view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rope(q, positions), self.rope(k, positions)
        return self.o_proj(self.attn(q, k, v).flatten(1))


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, window: int | None):
        super().__init__()
        self.self_attn = Olmo2Attention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, h):
        h = h + self.post_attention_layernorm(self.self_attn(positions, h))
        return h + self.post_feedforward_layernorm(self.mlp(h))


class Olmo2Model(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Olmo2DecoderLayer(cfg, w) for w in cfg.sliding_windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(positions, h)
        return self.norm(h)


class Olmo2ForCausalLM(nn.Module):
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = Olmo2Model(cfg)
        self.last_tokens = LastTokens()
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_hf_config(cls, config: dict) -> Olmo2ForCausalLM:
        return cls(LlamaConfig.from_hf(config))

    def forward(self, input_ids, positions):
        return self.lm_head(self.last_tokens(self.model(input_ids, positions)))
