"""Phi-3 (and Phi-3.5 / Phi-4-mini, same architecture): Llama's decoder (no biases, no q/k
norms; models/llama.py) whose checkpoint already packs q/k/v into `qkv_proj` and gate/up into
`gate_up_proj`, with optional partial rotary embedding and LongRoPE ("su"/"longrope") scaling.

LongRoPE: kiln uses the short factors, which transformers uses for sequences up to
`original_max_position_embeddings`; beyond it transformers switches to the long factors, so kiln
serves at most that many tokens (`max_position_embeddings` is capped there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kiln.errors import KilnError
from kiln.models.common import CausalLM, DecoderModel, HFConfig, rope_parameters
from kiln.models.llama import LlamaConfig, llama_layers

WEIGHTS = ()  # the checkpoint's names and packing are the spec's


@dataclass(frozen=True)
class Phi3Config(LlamaConfig):
    """Llama's config, read with Phi-3's rope convention."""

    @classmethod
    def from_hf(cls, config: dict) -> Phi3Config:
        config = HFConfig(config)
        if config.get("hidden_act", "silu") != "silu":
            raise KilnError(f"Phi-3 with activation {config['hidden_act']!r} is not supported; kiln runs silu")
        params = rope_parameters(config)
        if params.get("rope_type", params.get("type")) == "yarn":  # transformers reads Phi-3's "yarn" as longrope
            config = HFConfig({**config, "rope_parameters": {**params, "rope_type": "longrope"}})
        llama = super().from_hf(config)
        return dataclasses.replace(llama, qkv_bias=False, o_bias=False, mlp_bias=False)  # as transformers' Phi-3


class Phi3ForCausalLM(CausalLM):
    CONFIG = Phi3Config
    WEIGHTS = WEIGHTS

    def __init__(self, cfg: Phi3Config):
        super().__init__(cfg, DecoderModel(cfg, llama_layers(cfg)))
