"""AI2's OLMo 2: the Llama structure with norms moved. Each block's output is normalized before
it joins the residual stream (post_attention_layernorm, post_feedforward_layernorm; no norm on
the block inputs), and q and k are RMS-normalized over their WHOLE projection (num_heads *
head_dim channels, before the split into heads). Its config is Llama's (LlamaConfig), its MLP
is Llama's.
"""

from __future__ import annotations

from torch import nn

from kiln.frontend.blocks import RMSNorm
from kiln.models.common import CausalLM, DecoderModel, QKVAttention, attention_spec
from kiln.models.llama import WEIGHTS, LlamaConfig, LlamaMLP


class Olmo2Attention(QKVAttention):
    """q and k RMS-normalized over the whole projection, before the split into heads."""

    def __init__(self, cfg: LlamaConfig, window: int | None):
        super().__init__(cfg, attention_spec(cfg, window), cfg.rope, (cfg.qkv_bias, cfg.o_bias), qk_norm=False)
        self.q_norm = RMSNorm(self.q_size, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.kv_size, cfg.rms_norm_eps)

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


class Olmo2ForCausalLM(CausalLM):
    CONFIG = LlamaConfig
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg, DecoderModel(cfg, (Olmo2DecoderLayer(cfg, w) for w in cfg.sliding_windows)))
