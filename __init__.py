"""kiln: a compiler-driven LLM inference stack (model spec -> IR -> Triton kernels -> served artifact)."""

from kiln.errors import KilnError

__version__ = "0.1.0"
__all__ = ["KilnError", "__version__"]
