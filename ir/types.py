"""Tensor types with symbolic shapes.

Every dimension is a sympy expression: concrete sizes are `sympy.Integer`, the sizes that vary
from step to step are the symbols below. They stay symbols through every pass, so a compiled
graph is valid for any token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from kiln.contract import DTYPES

# The step's symbolic sizes (see DESIGN.md, "the step graph's calling convention").
T = sympy.Symbol("T", integer=True, positive=True)  # tokens in the step (all sequences, flattened)
B = sympy.Symbol("B", integer=True, positive=True)  # sequences in the step
M = sympy.Symbol("M", integer=True, positive=True)  # max KV blocks per sequence (block table width)
NB = sympy.Symbol("NB", integer=True, positive=True)  # physical KV blocks in the cache pool
NS = sympy.Symbol("NS", integer=True, positive=True)  # slots of the recurrent-state pool
STEP_SYMBOLS = (T, B, M, NB, NS)

FLOAT_DTYPES = ("f32", "f16", "bf16")
_NAME_OF = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> "f32"."""
    return _NAME_OF[dtype]


def as_dim(value) -> sympy.Expr:
    """An int or sympy expression as a sympy dimension."""
    return sympy.sympify(value)


@dataclass(frozen=True)
class TensorType:
    """A tensor's shape (tuple of sympy expressions) and dtype name ("f32", "bf16", "i32", ...)."""

    shape: tuple[sympy.Expr, ...]
    dtype: str

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(as_dim(d) for d in self.shape))
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> sympy.Expr:
        return sympy.Mul(*self.shape) if self.shape else sympy.Integer(1)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> sympy.Expr:
        return self.numel * self.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def with_shape(self, shape) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> TensorType:
        return TensorType(self.shape, dtype)

    def concrete_shape(self, bindings: dict[sympy.Symbol, int]) -> tuple[int, ...]:
        """The shape with every symbol replaced by its bound value."""
        return tuple(int(d.subs(bindings)) for d in self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class TupleType:
    """The type of a node with several outputs (a fused group that writes, e.g., a residual sum
    and its normalized value). Its elements are read with the `get` op."""

    types: tuple[TensorType, ...]

    def __post_init__(self):
        object.__setattr__(self, "types", tuple(self.types))
        if len(self.types) < 2 or not all(isinstance(t, TensorType) for t in self.types):
            raise ValueError(f"a TupleType holds two or more TensorTypes, got {self.types}")

    def __str__(self) -> str:
        return "(" + ", ".join(str(t) for t in self.types) + ")"


def tensor_types(type_: TensorType | TupleType) -> tuple[TensorType, ...]:
    """The tensor types a node produces: one for a TensorType, each element of a TupleType."""
    return type_.types if isinstance(type_, TupleType) else (type_,)
