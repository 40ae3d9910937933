"""The IR's op set: one table from op name to its kind, arity and type rule.

Ops are grouped by kind; passes decide fusion by kind (elementwise ops fuse into producers and
consumers, reductions fuse with the elementwise ops around them, matmuls absorb epilogues).
A type rule takes the input types and the node's attributes and returns the output type, or
raises `TypeError_` with a message naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import sympy

from kiln.ir.types import FLOAT_DTYPES, TensorType


class OpKind(str, Enum):
    SOURCE = "source"  # graph inputs, weights, mutable state, constants
    ELEMENTWISE = "elementwise"  # pointwise with broadcasting; fuse freely
    REDUCTION = "reduction"  # reduces over the last dim (norms)
    MATMUL = "matmul"
    DATA = "data"  # gathers, reshapes, slices: move data, compute nothing
    POSITIONAL = "positional"  # rotary embedding
    ATTENTION = "attention"  # reads and writes the paged KV cache


class TypeError_(Exception):
    """A type rule rejected its inputs (the verifier adds the node's name)."""


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: OpKind
    arity: tuple[int, int]  # (min, max) number of inputs
    infer: Callable[[list[TensorType], dict], TensorType]
    side_effects: bool = False  # writes state inputs: never dead-code eliminated


def _check(cond: bool, message: str):
    if not cond:
        raise TypeError_(message)


def _broadcast(types: list[TensorType], attrs: dict) -> TensorType:
    _check(len({t.dtype for t in types}) == 1, f"dtypes differ: {', '.join(str(t) for t in types)}")
    rank = max(t.rank for t in types)
    shape = []
    for i in range(rank):
        dims = {t.shape[i - rank + t.rank] for t in types if i - rank + t.rank >= 0} - {sympy.Integer(1)}
        _check(len(dims) <= 1, f"shapes do not broadcast: {', '.join(str(t) for t in types)}")
        shape.append(dims.pop() if dims else sympy.Integer(1))
    return TensorType(tuple(shape), types[0].dtype)


def _same(types, attrs):
    _check(types[0].dtype in FLOAT_DTYPES, f"expects a float tensor, got {types[0]}")
    return types[0]


def _cast(types, attrs):
    return types[0].with_dtype(attrs["dtype"])


def _source(types, attrs):
    return attrs["type"]


def _const(types, attrs):
    return TensorType((), attrs["dtype"])


def _rms_norm(types, attrs):
    x, w = types
    _check(w.shape == x.shape[-1:], f"weight {w} does not match the normalized dim of {x}")
    return x


def _linear(types, attrs):
    x, w = types[:2]
    _check(w.rank == 2 and x.shape[-1] == w.shape[1], f"x {x} @ w{w}^T: inner dims differ")
    if len(types) == 3:
        _check(types[2].shape == (w.shape[0],), f"bias {types[2]} does not match {w.shape[0]} outputs")
    return TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)


def _embedding(types, attrs):
    w, ids = types
    _check(ids.dtype in ("i32", "i64") and w.rank == 2, f"embedding(weight {w}, ids {ids})")
    return TensorType(ids.shape + (w.shape[1],), w.dtype)


def _gather_rows(types, attrs):
    x, idx = types
    _check(idx.rank == 1 and idx.dtype in ("i32", "i64"), f"row indices must be an int vector, got {idx}")
    return TensorType(idx.shape + x.shape[1:], x.dtype)


def _reshape(types, attrs):
    (x,) = types
    shape = tuple(sympy.sympify(d) for d in attrs["shape"])
    _check(sympy.simplify(sympy.Mul(*shape) - x.numel) == 0, f"cannot reshape {x} to {list(shape)}")
    return x.with_shape(shape)


def _slice(types, attrs):
    (x,) = types
    dim, start, stop = attrs["dim"], attrs["start"], attrs["stop"]
    _check(-x.rank <= dim < x.rank, f"slice dim {dim} out of range for {x}")
    size = x.shape[dim]
    _check(0 <= start < stop and (not size.is_number or stop <= size), f"slice [{start}:{stop}] out of {x}")
    shape = list(x.shape)
    shape[dim] = sympy.Integer(stop - start)
    return x.with_shape(shape)


def _rope(types, attrs):
    x, positions = types
    _check(x.rank == 3 and x.shape[-1] == attrs["spec"].head_dim, f"rope expects [T, H, {attrs['spec'].head_dim}], got {x}")
    _check(positions.shape == x.shape[:1], f"positions {positions} do not match tokens of {x}")
    return x


def _attention(types, attrs):
    q, k, v, k_cache, v_cache, query_start, seq_lens, block_tables, slot_mapping = types[:9]
    spec = attrs["spec"]
    want_q = (q.shape[0], spec.num_heads, spec.head_dim)
    want_kv = (q.shape[0], spec.num_kv_heads, spec.head_dim)
    _check(q.shape == want_q, f"q {q} does not match {spec}")
    _check(k.shape == want_kv and v.shape == want_kv, f"k {k} / v {v} do not match {spec}")
    cache = (k_cache.shape[0], spec.kv_layout.block_size, spec.num_kv_heads, spec.head_dim)
    _check(k_cache.shape == cache and v_cache.shape == cache, f"KV cache {k_cache} does not match {spec}")
    _check(k_cache.dtype == q.dtype == k.dtype == v.dtype, "q, k, v and the KV cache must share a dtype")
    _check(slot_mapping.shape == q.shape[:1], f"slot_mapping {slot_mapping} does not match tokens of q {q}")
    _check(len(types) == 9 + spec.sinks, "attention with sinks takes one extra input: sinks [num_heads]")
    return q


_OPS = [
    # sources: `input` (step inputs), `param` (weights), `state` (KV cache), `const` (a scalar)
    OpDef("input", OpKind.SOURCE, (0, 0), _source),
    OpDef("param", OpKind.SOURCE, (0, 0), _source),
    OpDef("state", OpKind.SOURCE, (0, 0), _source),
    OpDef("const", OpKind.SOURCE, (0, 0), _const),
    # elementwise, unary
    *(OpDef(n, OpKind.ELEMENTWISE, (1, 1), _same) for n in ("neg", "silu", "gelu_tanh", "exp", "tanh", "sigmoid", "rsqrt")),
    OpDef("cast", OpKind.ELEMENTWISE, (1, 1), _cast),
    # elementwise, binary with broadcasting
    *(OpDef(n, OpKind.ELEMENTWISE, (2, 2), _broadcast) for n in ("add", "sub", "mul", "div")),
    # reductions over the last dim
    OpDef("rms_norm", OpKind.REDUCTION, (2, 2), _rms_norm),
    # matmul: x [..., K] @ w[N, K]^T (+ bias[N])
    OpDef("linear", OpKind.MATMUL, (2, 3), _linear),
    # data movement
    OpDef("embedding", OpKind.DATA, (2, 2), _embedding),
    OpDef("gather_rows", OpKind.DATA, (2, 2), _gather_rows),
    OpDef("reshape", OpKind.DATA, (1, 1), _reshape),
    OpDef("slice", OpKind.DATA, (1, 1), _slice),
    # positional
    OpDef("rope", OpKind.POSITIONAL, (2, 2), _rope),
    # attention over the paged KV cache: writes k, v at slot_mapping, then attends
    OpDef("attention", OpKind.ATTENTION, (9, 10), _attention, side_effects=True),
]
OPS: dict[str, OpDef] = {op.name: op for op in _OPS}
