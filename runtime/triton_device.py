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


# -- the row kernel's ops (kiln.codegen.kernels.rows): the names the op registry's `triton`
# strings call (ir/ops.py). fp32 blocks; `mask` marks the valid lanes of a row (padded blocks),
# `width` is the number of valid lanes along the reduced (last) axis.


@helper
def gelu_erf(x):
    """GELU, exact erf form (PyTorch's default F.gelu), for fp32 x."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@helper
def softplus(x, beta, threshold):
    """torch's softplus: log(1 + exp(beta * x)) / beta, and x itself where beta * x > threshold."""
    z = x * beta
    soft = (tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))) / beta
    return tl.where(z > threshold, x, soft)


@helper
def clamp(x, lo, hi):
    """torch.clamp(x, lo, hi); None leaves that side open."""
    if lo is not None:
        x = tl.maximum(x, lo)
    if hi is not None:
        x = tl.minimum(x, hi)
    return x


@helper
def pow_(x, y):
    """torch.pow(x, y) for fp32 blocks or scalars: exp2(y * log2|x|) with the sign of an odd
    integer power, exact products for the exponents models write (0, 1, 2, 3, 0.5, -1, -2)."""
    x = tl.where(y == y, x, x)  # both operands as blocks, whichever was a Python scalar
    y = tl.where(x == x, y, y)
    magnitude = tl.exp2(y * tl.log2(tl.abs(x)))
    integer = tl.floor(y) == y
    odd = integer & (tl.floor(y * 0.5) * 2.0 != y)
    result = tl.where((x < 0.0) & odd, -magnitude, magnitude)
    result = tl.where((x < 0.0) & ~integer, float("nan"), result)
    result = tl.where(y == 2.0, x * x, result)
    result = tl.where(y == 3.0, x * x * x, result)
    result = tl.where(y == 1.0, x, result)
    result = tl.where(y == 0.5, tl.sqrt(x), result)
    result = tl.where(y == -1.0, 1.0 / x, result)
    result = tl.where(y == -2.0, 1.0 / (x * x), result)
    return tl.where(y == 0.0, 1.0, result)


@helper
def rms_norm_rstd(x, mask, width, eps):
    """1 / sqrt(mean(x^2) + eps) over the valid lanes of each row of x: [L, D] -> [L, 1]."""
    return tl.rsqrt(tl.sum(tl.where(mask, x * x, 0.0), axis=-1, keep_dims=True) / width + eps)


@helper
def rms_norm(x, mask, width, eps):
    """x * rms_norm_rstd(x): the normalized rows (the caller applies the weight)."""
    return x * rms_norm_rstd(x, mask, width, eps)


@helper
def layer_norm_stats(x, mask, width, eps):
    """(mean, 1 / sqrt(var + eps)) over the valid lanes of each row: [L, D] -> two [L, 1]."""
    mean = tl.sum(tl.where(mask, x, 0.0), axis=-1, keep_dims=True) / width
    centered = tl.where(mask, x - mean, 0.0)
    return mean, tl.rsqrt(tl.sum(centered * centered, axis=-1, keep_dims=True) / width + eps)


@helper
def layer_norm(x, mask, width, eps):
    """(x - mean) / sqrt(var + eps) per row (the caller applies weight and bias)."""
    mean, rstd = layer_norm_stats(x, mask, width, eps)
    return (x - mean) * rstd


@helper
def softmax_stats(x, mask):
    """(max, sum of exp(x - max)) over the valid lanes of each row: [L, D] -> two [L, 1]."""
    peak = tl.max(tl.where(mask, x, float("-inf")), axis=-1, keep_dims=True)
    return peak, tl.sum(tl.where(mask, tl.exp(x - peak), 0.0), axis=-1, keep_dims=True)


@helper
def softmax(x, mask):
    """softmax over the valid lanes of each row."""
    peak, total = softmax_stats(x, mask)
    return tl.exp(x - peak) / total


@helper
def log_softmax(x, mask):
    """log_softmax over the valid lanes of each row."""
    peak, total = softmax_stats(x, mask)
    return x - peak - tl.log(total)
