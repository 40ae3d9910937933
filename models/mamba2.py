"""Mamba2 (transformers `mamba2`): a stack of SSD mixers, no attention at all.

A mixer projects the input into z (the gate), xBC and dt; xBC goes through a causal conv1d +
SiLU and splits into x (num_heads heads of head_dim), B and C (n_groups groups of state_size).
The SSD scan is kiln's "gated" recurrence (ir/linear_rules.py) with q = C, k = B, v = dt x and
log decay g = dt A (dt = softplus(dt + dt_bias), A = -exp(A_log)), unscaled; then the skip D x,
a gated RMSNorm per group of heads (norm(y * SiLU(z)), HF's norm_before_gate=False) and
out_proj. Names follow HF's (`backbone.embeddings`, `backbone.layers.*.mixer`, `backbone.norm_f`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.frontend.blocks import CausalConv1d, Embedding, LastTokens, Linear, LinearAttention, RMSNorm, meta_parameter
from kiln.ir.specs import LinearAttentionSpec
from kiln.models.common import HFConfig

# With no attention, the context is bounded by nothing kiln keeps per token: this many tokens.
MAX_CONTEXT = 1 << 17


@dataclass(frozen=True)
class Mamba2Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    conv_kernel: int
    eps: float
    use_bias: bool = False
    use_conv_bias: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = MAX_CONTEXT

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_hf(cls, config: dict) -> Mamba2Config:
        config = HFConfig(config)
        if config.get("hidden_act", "silu") != "silu":
            raise KilnError(f"Mamba2 with hidden_act {config['hidden_act']!r} is not supported; kiln runs silu")
        heads, head_dim, hidden = config["num_heads"], config["head_dim"], config["hidden_size"]
        if heads * head_dim != int(config.get("expand", 2) * hidden):
            raise KilnError(f"Mamba2's num_heads x head_dim ({heads} x {head_dim}) must equal expand x hidden_size "
                            f"({config.get('expand', 2)} x {hidden}), as transformers' mixer assumes")
        limit = tuple(_json_float(v) for v in config.get("time_step_limit") or (0.0, math.inf))
        return cls(vocab_size=config["vocab_size"], hidden_size=hidden, num_layers=config["num_hidden_layers"],
                   num_heads=heads, head_dim=head_dim, state_size=config["state_size"], n_groups=config["n_groups"],
                   conv_kernel=config["conv_kernel"], eps=config["layer_norm_epsilon"],
                   use_bias=bool(config.get("use_bias", False)), use_conv_bias=bool(config.get("use_conv_bias", True)),
                   time_step_limit=(limit[0], limit[1]), tie_word_embeddings=bool(config.get("tie_word_embeddings")))


def _json_float(value) -> float:
    """A float of config.json; transformers writes infinities as {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, dict) else value)


class GroupedGatedRMSNorm(nn.Module):
    """HF's MambaRMSNormGated: x * SiLU(gate), RMS-normalized per group of `group` channels (fp32),
    scaled by weight [dim]."""

    def __init__(self, dim: int, group: int, eps: float):
        super().__init__()
        self.dim, self.group = dim, group
        self.rms = RMSNorm(group, eps, weight=False)
        self.weight = meta_parameter(dim)

    def forward(self, x, gate):
        h = self.rms((x.float() * F.silu(gate.float())).view(-1, self.dim // self.group, self.group))
        return (self.weight.float() * h.view(-1, self.dim)).to(gate.dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        inner, groups = cfg.intermediate_size, cfg.n_groups * cfg.state_size
        self.conv_dim = inner + 2 * groups
        self.in_proj = Linear(cfg.hidden_size, inner + self.conv_dim + cfg.num_heads, bias=cfg.use_bias)
        self.conv1d = CausalConv1d(self.conv_dim, cfg.conv_kernel, bias=cfg.use_conv_bias, activation="silu")
        self.dt_bias = meta_parameter(cfg.num_heads)
        self.A_log = meta_parameter(cfg.num_heads)
        self.D = meta_parameter(cfg.num_heads)
        self.scan = LinearAttention(LinearAttentionSpec("gated", cfg.n_groups, cfg.num_heads, cfg.state_size,
                                                        cfg.head_dim, scale=1.0))
        self.norm = GroupedGatedRMSNorm(inner, inner // cfg.n_groups, cfg.eps)
        self.out_proj = Linear(inner, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, h):
        cfg, inner, groups = self.cfg, self.cfg.intermediate_size, self.cfg.n_groups * self.cfg.state_size
        z, xbc, dt = self.in_proj(h).split([inner, self.conv_dim, cfg.num_heads], dim=-1)
        x, b, c = self.conv1d(xbc).split([inner, groups, groups], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if cfg.time_step_limit != (0.0, math.inf):
            dt = torch.clamp(dt, cfg.time_step_limit[0], cfg.time_step_limit[1])
        x = x.reshape(-1, cfg.num_heads, cfg.head_dim).float()  # the scan and the skip in fp32, as HF
        y = self.scan(c.reshape(-1, cfg.n_groups, cfg.state_size).float(),
                      b.reshape(-1, cfg.n_groups, cfg.state_size).float(), x * dt.unsqueeze(-1),
                      -torch.exp(self.A_log.float()) * dt)
        y = y + x * self.D.float().unsqueeze(-1)
        return self.out_proj(self.norm(y.reshape(-1, inner), z))


class Mamba2Block(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.eps)
        self.mixer = Mamba2Mixer(cfg)

    def forward(self, h):
        return h + self.mixer(self.norm(h))


class Mamba2Backbone(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.embeddings = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Mamba2Block(cfg) for _ in range(cfg.num_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.eps)

    def forward(self, input_ids):
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm_f(h)


class Mamba2ForCausalLM(nn.Module):
    CONFIG = Mamba2Config
    WEIGHTS: tuple = ()

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.config = cfg
        self.backbone = Mamba2Backbone(cfg)
        self.last_tokens = LastTokens()
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @classmethod
    def from_hf_config(cls, config: dict) -> Mamba2ForCausalLM:
        return cls(cls.CONFIG.from_hf(config))

    def forward(self, input_ids, positions):
        return self.lm_head(self.last_tokens(self.backbone(input_ids)))
