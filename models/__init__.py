"""Model specs, and the one explicit table from a checkpoint's HF `architectures` name to its spec.

Adding an architecture: write `models/<family>.py` (a spec class with `from_hf_config(dict)`
and `WEIGHTS`) and add its names here.
"""

from __future__ import annotations

from torch import nn

from kiln.errors import KilnError
from kiln.models.gemma import GemmaForCausalLM
from kiln.models.gpt_oss import GptOssForCausalLM
from kiln.models.granite import GraniteForCausalLM
from kiln.models.llama import LlamaForCausalLM
from kiln.models.mamba2 import Mamba2ForCausalLM
from kiln.models.mixtral import MixtralForCausalLM
from kiln.models.olmo2 import Olmo2ForCausalLM
from kiln.models.phi3 import Phi3ForCausalLM
from kiln.models.qwen3_moe import QwenMoeForCausalLM
from kiln.models.qwen3_next import Qwen3NextForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "Qwen2MoeForCausalLM": QwenMoeForCausalLM,
    "Qwen3MoeForCausalLM": QwenMoeForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "Qwen3NextForCausalLM": Qwen3NextForCausalLM,
    "Mamba2ForCausalLM": Mamba2ForCausalLM,
}


def spec_class(config: dict) -> type[nn.Module]:
    """The spec class for an HF config dict; a clear error for unknown architectures."""
    names = config.get("architectures") or []
    if not names:
        raise KilnError("config.json has no `architectures` entry, so kiln cannot tell which model this is")
    if names[0] not in ARCHITECTURES:
        raise KilnError(f"architecture {names[0]!r} is not supported; kiln supports: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[names[0]]


def build_spec(config: dict) -> nn.Module:
    """The spec module (parameters on the meta device) for an HF config dict."""
    return spec_class(config).from_hf_config(config)
