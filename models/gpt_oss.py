"""GPT-OSS: attention with q/k/v/o biases and a learned sink logit per head (it joins each
softmax's denominator), alternating sliding-window and full layers (`layer_types`), YaRN rope,
and in every layer a mixture of experts: router `mlp.router` (a Linear with bias) ->
top_k_softmax, experts with biases and the clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`).

The checkpoint stores the experts as [E, in, out] with gate and up interleaved along the last
dim; the loader de-interleaves and transposes them into the Experts block's layout (WEIGHTS).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from kiln.frontend.blocks import Experts, Linear
from kiln.frontend.weights import Concat, Deinterleave, Transpose
from kiln.models.common import (
    PACKED_QKV_GATE_UP,
    CausalLM,
    DecoderModel,
    PreNormDecoderLayer,
    QKVAttention,
    attention_spec,
    extend_config,
)
from kiln.models.llama import LlamaConfig
from kiln.models.moe import check_top_k, num_experts, top_k_softmax

_EXPERTS = "model.layers.*.mlp.experts"
WEIGHTS = (
    *PACKED_QKV_GATE_UP,
    Concat("model.layers.*.self_attn.attn.sinks", ("model.layers.*.self_attn.sinks",)),
    Deinterleave((f"{_EXPERTS}.gate_up_proj", f"{_EXPERTS}.gate_up_proj_bias")),  # [.., g0, u0, g1, u1, ..]
    Transpose((f"{_EXPERTS}.gate_up_proj", f"{_EXPERTS}.down_proj"), dim0=1, dim1=2),  # [E, in, out] -> [E, out, in]
)


@dataclass(frozen=True)
class GptOssConfig(LlamaConfig):
    num_experts: int = 0
    top_k: int = 1
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @classmethod
    def from_hf(cls, config: dict) -> GptOssConfig:
        base = LlamaConfig.from_hf(config)
        check_top_k(config["num_experts_per_tok"], num_experts(config))
        return extend_config(cls, base, num_experts=num_experts(config), top_k=config["num_experts_per_tok"],
                             swiglu_alpha=config.get("swiglu_alpha", 1.702), swiglu_limit=config.get("swiglu_limit", 7.0))


class GptOssAttention(QKVAttention):
    def __init__(self, cfg: GptOssConfig, window: int | None):
        spec = dataclasses.replace(attention_spec(cfg, window), sinks=True)
        super().__init__(cfg, spec, cfg.rope, (cfg.qkv_bias, cfg.o_bias), qk_norm=False)


class GptOssMLP(nn.Module):
    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=True)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, activation="swiglu_clamped",
                               alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit, bias=True)

    def forward(self, x):
        weights, ids = top_k_softmax(self.router(x), self.top_k)
        return self.experts(x, weights, ids)


class GptOssForCausalLM(CausalLM):
    CONFIG = GptOssConfig
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: GptOssConfig):
        layers = (PreNormDecoderLayer(cfg, GptOssAttention(cfg, w), GptOssMLP(cfg)) for w in cfg.sliding_windows)
        super().__init__(cfg, DecoderModel(cfg, layers))
