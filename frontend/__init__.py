"""kiln.frontend: model-spec building blocks, the fx tracer, and checkpoint loading.

The names below load their module on first use (PEP 562), so that importing one light module of
the package (`kiln.frontend.checkpoint` for the compile cache's lookup) does not load the tracer,
the IR and sympy.
"""

import importlib

_MODULES = {
    "Attention": "blocks", "CausalConv1d": "blocks", "LinearAttention": "blocks", "Embedding": "blocks",
    "Experts": "blocks", "LastTokens": "blocks", "Linear": "blocks",
    "RMSNorm": "blocks", "Rope": "blocks", "BUILTIN_MODELS": "builtin", "Checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint", "save_hf_dir": "checkpoint", "StepConfig": "tracer", "trace": "tracer",
    "Concat": "weights", "load_weights": "weights",
}
__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
