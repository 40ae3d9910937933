"""kiln: a compiler-driven LLM inference stack (model spec -> IR -> Triton kernels -> served artifact)."""

from kiln.errors import KilnError

__version__ = "0.1.0"


def __getattr__(name: str):
    # `kiln.LLM` and `kiln.SamplingParams` import the runtime lazily, so `import kiln.ir` stays light
    if name == "LLM":
        from kiln.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kiln.runtime.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


__all__ = ["KilnError", "LLM", "SamplingParams", "__version__"]
