"""kiln.frontend: model-spec building blocks, the fx tracer, and checkpoint loading."""

from kiln.frontend.blocks import Attention, Embedding, Experts, LastTokens, Linear, RMSNorm, Rope
from kiln.frontend.builtin import BUILTIN_MODELS
from kiln.frontend.checkpoint import Checkpoint, load_checkpoint, save_hf_dir
from kiln.frontend.trace import StepConfig, trace
from kiln.frontend.weights import Concat, load_weights

__all__ = [
    "Attention", "Embedding", "Experts", "LastTokens", "Linear", "RMSNorm", "Rope", "BUILTIN_MODELS", "Checkpoint",
    "load_checkpoint", "save_hf_dir", "StepConfig", "trace", "Concat", "load_weights",
]
