"""Mixtral: Mistral's attention (optional sliding window) with a sparse MoE block,
`block_sparse_moe`, in every layer: softmax_top_k routing, always renormalized, silu-gated
experts whose HF projections w1 (gate), w3 (up), w2 (down) the loader stacks (models/moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.models.common import PACKED_QKV_GATE_UP, CausalLM, DecoderModel, PreNormDecoderLayer, extend_config
from kiln.models.llama import LlamaAttention, LlamaConfig
from kiln.models.moe import SparseMoE, check_top_k, num_experts, stacked_expert_rules

WEIGHTS = (*PACKED_QKV_GATE_UP, *stacked_expert_rules("model.layers.*.block_sparse_moe", "w1", "w3", "w2"))


@dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
    num_experts: int = 0
    top_k: int = 1

    @classmethod
    def from_hf(cls, config: dict) -> MixtralConfig:
        base = LlamaConfig.from_hf(config)
        check_top_k(config["num_experts_per_tok"], num_experts(config))
        return extend_config(cls, base, num_experts=num_experts(config), top_k=config["num_experts_per_tok"])


class MixtralForCausalLM(CausalLM):
    CONFIG = MixtralConfig
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: MixtralConfig):
        def layer(window: int | None) -> PreNormDecoderLayer:
            moe = SparseMoE(cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.intermediate_size, renormalize=True)
            return PreNormDecoderLayer(cfg, LlamaAttention(cfg, window), moe, mlp_name="block_sparse_moe")

        super().__init__(cfg, DecoderModel(cfg, (layer(w) for w in cfg.sliding_windows)))
