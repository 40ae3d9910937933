"""Triton device helpers shared by the generated kernels (ordinary Python, imported by them).

Helpers are decorated with `helper`, not `triton.jit`: Triton decides "interpreted or compiled"
when it decorates, and one process may both interpret kernels (TRITON_INTERPRET=1, tests and
CPU verification) and cross-compile them (AOT). A `helper` is a `JITFunction` for the compiler
and, when an interpreted kernel calls it, runs through Triton's interpreter.
"""

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


class DeviceHelper(JITFunction):
    """A `@triton.jit` device function that interpreted kernels can call too."""

    def __call__(self, *args, **kwargs):
        return InterpretedFunction(self.fn)(*args, **kwargs)


def helper(fn) -> DeviceHelper:
    return DeviceHelper(fn)


@helper
def silu(x):
    """x * sigmoid(x), for fp32 x."""
    return x / (1.0 + tl.exp(-x))


@helper
def tanh(x):
    """tanh from exp (libdevice externs do not run in the interpreter); saturates to +-1."""
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@helper
def gelu_tanh(x):
    """GELU, tanh approximation (PyTorch approximate="tanh"), for fp32 x."""
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
