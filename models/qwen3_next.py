"""Qwen3-Next: a hybrid of Gated DeltaNet (linear attention) layers and gated full attention layers,
in the order of the config's `layer_types` (by default three linear layers, then one full).

Linear layers (HF `linear_attn`): one projection gives, per key head, q, k (head_k_dim each) and
the v and z of its num_v_heads / num_k_heads value heads; another gives b and a per value head.
The loader regroups both projections' rows (`Regroup`) so that they give all heads' q, then k,
v, z (and b, then a) as contiguous blocks: q, k, v are then the conv's input as they come.
q, k, v go through a short causal conv1d + SiLU, then the gated delta rule with
beta = sigmoid(b), log decay g = -exp(A_log) * softplus(a + dt_bias), q and k L2-normalized; the
output is RMS-normalized per value head and gated by SiLU(z) (HF's RMSNormGated) before out_proj.
Full layers (HF `self_attn`): q_proj gives each head's query and an output gate; q and k are
RMS-normalized per head, rope is partial (`partial_rotary_factor`), the attention output is
multiplied by sigmoid(gate). RMSNorms scale by `1 + w` (the loader adds the 1), the gated one by
`w`. The MLPs are dense; MoE layers (Qwen3-Next's sparse blocks with a shared expert) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.frontend.blocks import Attention, CausalConv1d, Linear, LinearAttention, RMSNorm, Rope, meta_parameter
from kiln.frontend.weights import AddConstant, Regroup
from kiln.ir.specs import AttentionKind, AttentionSpec, LinearAttentionSpec, RopeSpec
from kiln.models.common import (
    PACKED_QKV_GATE_UP,
    CausalLM,
    DecoderModel,
    HFConfig,
    head_dim,
    rope_parameters,
    rope_spec,
    served_max_position,
)
from kiln.models.llama import LlamaMLP

_NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")
WEIGHTS = PACKED_QKV_GATE_UP + (
    AddConstant(tuple(f"model.layers.*.{n}.weight" for n in _NORMS) + ("model.norm.weight",), 1.0),
)


@dataclass(frozen=True)
class Qwen3NextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layer_types: tuple[str, ...]  # per layer: "linear_attention" or "full_attention"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec
    linear: LinearAttentionSpec
    conv_kernel: int
    rms_norm_eps: float
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf(cls, config: dict) -> Qwen3NextConfig:
        config = HFConfig(config)
        layers = config["num_hidden_layers"]
        interval = config.get("full_attention_interval", 4)
        types = tuple(config.get("layer_types") or ("full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                                     for i in range(layers)))
        sparse = [i for i in range(layers) if config.get("num_experts", 0) > 0 and i not in config.get("mlp_only_layers", [])
                  and (i + 1) % config.get("decoder_sparse_step", 1) == 0]
        if sparse:
            raise KilnError(f"this Qwen3-Next checkpoint has mixture-of-experts layers ({len(sparse)} of {layers}); kiln "
                            "serves Qwen3-Next with dense MLPs only so far (`mlp_only_layers` covering every layer)")
        if config.get("hidden_act", "silu") != "silu":
            raise KilnError(f"Qwen3-Next with hidden_act {config['hidden_act']!r} is not supported; kiln runs silu")
        hd = head_dim(config)
        rope = rope_spec(config, rope_parameters(config), hd)
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            layer_types=types,
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=hd,
            rope=rope,
            linear=LinearAttentionSpec("gated_delta", config["linear_num_key_heads"], config["linear_num_value_heads"],
                                       config["linear_key_head_dim"], config["linear_value_head_dim"], qk_l2norm=True),
            conv_kernel=config["linear_conv_kernel_dim"],
            rms_norm_eps=config["rms_norm_eps"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=served_max_position(config, rope),
        )


class GatedAttention(nn.Module):
    """HF's `self_attn`: qkv_proj packs q_proj (each head's query, then its gate), k_proj, v_proj."""

    def __init__(self, cfg: Qwen3NextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, 2 * self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.rope = Rope(cfg.rope)
        self.attn = Attention(AttentionSpec(AttentionKind.DENSE, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim))

    def forward(self, positions, x):
        q_gate, k, v = self.qkv_proj(x).split([2 * self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, gate = q_gate.view(-1, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.rope(self.q_norm(q), positions)
        k = self.rope(self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim)), positions)
        out = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim))
        return self.o_proj(out.flatten(1) * torch.sigmoid(gate.reshape(-1, self.q_size)))


class GatedDeltaNet(nn.Module):
    """HF's `linear_attn` (see the module docstring)."""

    def __init__(self, cfg: Qwen3NextConfig):
        super().__init__()
        spec = cfg.linear
        self.spec = spec
        self.key_dim, self.value_dim = spec.num_k_heads * spec.head_k_dim, spec.num_v_heads * spec.head_v_dim
        self.in_proj_qkvz = Linear(cfg.hidden_size, 2 * self.key_dim + 2 * self.value_dim)
        self.in_proj_ba = Linear(cfg.hidden_size, 2 * spec.num_v_heads)
        self.conv1d = CausalConv1d(2 * self.key_dim + self.value_dim, cfg.conv_kernel, activation="silu")
        self.dt_bias = meta_parameter(spec.num_v_heads)
        self.A_log = meta_parameter(spec.num_v_heads)
        self.attn = LinearAttention(spec)
        self.norm = RMSNorm(spec.head_v_dim, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, cfg.hidden_size)

    def forward(self, x):
        s = self.spec
        qkv, z = self.in_proj_qkvz(x).split([2 * self.key_dim + self.value_dim, self.value_dim], dim=-1)
        q, k, v = self.conv1d(qkv).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        b, a = self.in_proj_ba(x).split([s.num_v_heads, s.num_v_heads], dim=-1)
        beta = torch.sigmoid(b)
        g = -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float())
        out = self.attn(q.view(-1, s.num_k_heads, s.head_k_dim), k.view(-1, s.num_k_heads, s.head_k_dim),
                        v.view(-1, s.num_v_heads, s.head_v_dim), g, beta)
        out = self.norm(out) * F.silu(z.reshape(-1, s.num_v_heads, s.head_v_dim))
        return self.out_proj(out.reshape(-1, self.value_dim))


class Qwen3NextDecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3NextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.layer_types[layer] == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = GatedAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, positions, h):
        x = self.input_layernorm(h)
        h = h + (self.linear_attn(x) if hasattr(self, "linear_attn") else self.self_attn(positions, x))
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3NextForCausalLM(CausalLM):
    CONFIG = Qwen3NextConfig
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: Qwen3NextConfig):
        unknown = set(cfg.layer_types) - {"linear_attention", "full_attention"}
        if unknown:
            raise KilnError(f"Qwen3-Next layer types {sorted(unknown)} are unknown; kiln runs linear_attention and "
                            "full_attention layers")
        super().__init__(cfg, DecoderModel(cfg, (Qwen3NextDecoderLayer(cfg, i) for i in range(len(cfg.layer_types)))))
        s, per_key = cfg.linear, cfg.linear.num_v_heads // cfg.linear.num_k_heads
        self.WEIGHTS = WEIGHTS + (  # this config's head grouping of the linear layers' projections
            Regroup("model.layers.*.linear_attn.in_proj_qkvz.weight", s.num_k_heads,
                    (s.head_k_dim, s.head_k_dim, per_key * s.head_v_dim, per_key * s.head_v_dim)),
            Regroup("model.layers.*.linear_attn.in_proj_ba.weight", s.num_k_heads, (per_key, per_key)))
