"""Qwen3-MoE and Qwen2-MoE: Qwen's attention (Qwen3: q/k RMSNorm; Qwen2: q/k/v bias) with a sparse
MoE block in place of the MLP in every `decoder_sparse_step`-th layer not in `mlp_only_layers`
(those keep a dense MLP of `intermediate_size`). The router is softmax_top_k, renormalized when
`norm_topk_prob`; Qwen2-MoE adds a shared expert scaled by a sigmoid gate (models/moe.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from kiln.models.common import PACKED_QKV_GATE_UP, CausalLM, DecoderModel, HFConfig, PreNormDecoderLayer, extend_config
from kiln.models.llama import LlamaAttention, LlamaConfig, LlamaMLP
from kiln.models.moe import SparseMoE, check_top_k, num_experts, shared_expert_rule, stacked_expert_rules

WEIGHTS = (*PACKED_QKV_GATE_UP, *stacked_expert_rules("model.layers.*.mlp", "gate_proj", "up_proj", "down_proj"),
           shared_expert_rule("model.layers.*.mlp"))


@dataclass(frozen=True)
class QwenMoeConfig(LlamaConfig):
    num_experts: int = 0
    top_k: int = 1
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE
    sparse_layers: tuple[bool, ...] = ()  # per layer: a sparse MoE block (else a dense MLP)

    @classmethod
    def from_hf(cls, config: dict) -> QwenMoeConfig:
        config = HFConfig(config)
        qwen2 = config["architectures"][0] == "Qwen2MoeForCausalLM"
        base = dataclasses.replace(LlamaConfig.from_hf(config), qk_norm=not qwen2,
                                   qkv_bias=qwen2 and bool(config.get("qkv_bias", True)))
        experts, step = num_experts(config), config.get("decoder_sparse_step", 1)
        dense = set(config.get("mlp_only_layers") or ())
        check_top_k(config["num_experts_per_tok"], experts)
        return extend_config(
            cls, base,
            num_experts=experts,
            top_k=config["num_experts_per_tok"],
            moe_intermediate_size=config["moe_intermediate_size"],
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=config["shared_expert_intermediate_size"] if qwen2 else None,
            sparse_layers=tuple(i not in dense and experts > 0 and (i + 1) % step == 0
                                for i in range(base.num_layers)),
        )


def _mlp(cfg: QwenMoeConfig, sparse: bool) -> nn.Module:
    if not sparse:
        return LlamaMLP(cfg)
    return SparseMoE(cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.norm_topk_prob,
                     cfg.shared_expert_intermediate_size)


class QwenMoeForCausalLM(CausalLM):
    CONFIG = QwenMoeConfig
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: QwenMoeConfig):
        layers = (PreNormDecoderLayer(cfg, LlamaAttention(cfg, w), _mlp(cfg, sparse))
                  for w, sparse in zip(cfg.sliding_windows, cfg.sparse_layers))
        super().__init__(cfg, DecoderModel(cfg, layers))
