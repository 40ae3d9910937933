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

from kiln.ir.types import FLOAT_DTYPES, TensorType, TupleType


class OpKind(str, Enum):
    SOURCE = "source"  # graph inputs, weights, mutable state, constants
    ELEMENTWISE = "elementwise"  # pointwise with broadcasting; fuse freely
    REDUCTION = "reduction"  # reduces over the last dim (norms)
    MATMUL = "matmul"
    DATA = "data"  # gathers, reshapes, slices: move data, compute nothing
    POSITIONAL = "positional"  # rotary embedding
    ATTENTION = "attention"  # reads (and, before lowering, writes) the paged KV cache
    STORE = "store"  # writes rows into a state buffer (the paged KV write)
    FUSED = "fused"  # a fused group: one kernel whose body is a sub-graph (see FusionPattern)


class TypeError_(Exception):
    """A type rule rejected its inputs (the verifier adds the node's name)."""


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: OpKind
    arity: tuple[int, int]  # (min, max) number of inputs
    infer: Callable[[list[TensorType], dict], TensorType]
    side_effects: bool = False  # writes state inputs: never dead-code eliminated
    view: bool = False  # a view of input 0 (reshape, slice, get): moves no data, launches nothing
    aliases: int | None = None  # the output shares the storage of this input (views; kv_write's cache)


@dataclass(frozen=True)
class FusionPattern:
    """What a `fused` node computes, for codegen to pick a template: the anchor op (the one
    matmul, reduction, gather or attention of the group; None for a purely elementwise group),
    the ops before it (prologue) and after it (epilogue), in body order, views left out.
    Printed as `rms_norm > linear > silu, mul`."""

    anchor: str | None
    prologue: tuple[str, ...] = ()
    epilogue: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.anchor is None:
            return ", ".join(self.epilogue)
        parts = [", ".join(self.prologue), self.anchor, ", ".join(self.epilogue)]
        return " > ".join(p for p in parts if p)


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
    x, *weight = types  # no weight: it was folded into the consuming linear (passes/fold_norm_weights)
    _check(all(w.shape == x.shape[-1:] for w in weight), f"weight {weight} does not match the normalized dim of {x}")
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


def _check_paged(q, k_cache, v_cache, spec):
    _check(q.shape == (q.shape[0], spec.num_heads, spec.head_dim), f"q {q} does not match {spec}")
    cache = (k_cache.shape[0], spec.kv_layout.block_size, spec.num_kv_heads, spec.head_dim)
    _check(k_cache.shape == cache and v_cache.shape == cache, f"KV cache {k_cache} does not match {spec}")
    _check(k_cache.dtype == v_cache.dtype == q.dtype, "q and the KV cache must share a dtype")


def _attention(types, attrs):
    q, k, v, k_cache, v_cache, query_start, seq_lens, block_tables, slot_mapping = types[:9]
    spec = attrs["spec"]
    _check_paged(q, k_cache, v_cache, spec)
    want_kv = (q.shape[0], spec.num_kv_heads, spec.head_dim)
    _check(k.shape == want_kv and v.shape == want_kv, f"k {k} / v {v} do not match {spec}")
    _check(k_cache.dtype == k.dtype == v.dtype, "q, k, v and the KV cache must share a dtype")
    _check(slot_mapping.shape == q.shape[:1], f"slot_mapping {slot_mapping} does not match tokens of q {q}")
    _check(len(types) == 9 + spec.sinks, "attention with sinks takes one extra input: sinks [num_heads]")
    return q


def _kv_write(types, attrs):
    x, cache, slot_mapping = types
    _check(x.rank == 3 and cache.rank == 4 and x.shape[1:] == cache.shape[2:], f"rows {x} do not fit the cache {cache}")
    _check(x.dtype == cache.dtype, f"rows {x} and cache {cache} must share a dtype")
    _check(slot_mapping.shape == x.shape[:1] and slot_mapping.dtype == "i32", f"slot_mapping {slot_mapping} does not match rows of {x}")
    return cache


def _attention_prefill(types, attrs):
    q, k_cache, v_cache, query_start, seq_lens, block_tables, *sinks = types
    _check_paged(q, k_cache, v_cache, attrs["spec"])
    _check(len(sinks) == attrs["spec"].sinks, "attention with sinks takes one extra input: sinks [num_heads]")
    return q


def _attention_decode(types, attrs):
    q, k_cache, v_cache, seq_lens, block_tables, *sinks = types
    _check_paged(q, k_cache, v_cache, attrs["spec"])
    _check(seq_lens.shape == q.shape[:1], f"decode attention has one query per sequence: q {q}, seq_lens {seq_lens}")
    _check(len(sinks) == attrs["spec"].sinks, "attention with sinks takes one extra input: sinks [num_heads]")
    return q


def _get(types, attrs):
    (x,) = types
    _check(isinstance(x, TupleType) and 0 <= attrs["index"] < len(x.types), f"get index {attrs['index']} of {x}")
    return x.types[attrs["index"]]


def _fused(types, attrs):
    body = attrs["body"]
    wanted = [n.type for n in body.inputs]
    _check(list(types) == wanted, f"inputs ({', '.join(map(str, types))}) do not match body {body.name} "
                                  f"({', '.join(map(str, wanted))})")
    outputs = [n.type for n in body.outputs.values()]
    return outputs[0] if len(outputs) == 1 else TupleType(tuple(outputs))


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
    OpDef("rms_norm", OpKind.REDUCTION, (1, 2), _rms_norm),
    # matmul: x [..., K] @ w[N, K]^T (+ bias[N])
    OpDef("linear", OpKind.MATMUL, (2, 3), _linear),
    # data movement
    OpDef("embedding", OpKind.DATA, (2, 2), _embedding),
    OpDef("gather_rows", OpKind.DATA, (2, 2), _gather_rows),
    OpDef("reshape", OpKind.DATA, (1, 1), _reshape, view=True, aliases=0),
    OpDef("slice", OpKind.DATA, (1, 1), _slice, view=True, aliases=0),
    OpDef("get", OpKind.DATA, (1, 1), _get, view=True, aliases=0),  # element `index` of a multi-output node
    # positional
    OpDef("rope", OpKind.POSITIONAL, (2, 2), _rope),
    # attention over the paged KV cache: writes k, v at slot_mapping, then attends
    OpDef("attention", OpKind.ATTENTION, (9, 10), _attention, side_effects=True),
    # lowered attention (passes/lower_attention): the KV write, then a paged attention per phase.
    # kv_write(x [T, Hkv, D], cache, slot_mapping) stores the rows and returns the updated cache.
    OpDef("kv_write", OpKind.STORE, (3, 3), _kv_write, side_effects=True, aliases=1),
    # (q, k_cache, v_cache, query_start, seq_lens, block_tables[, sinks]): any mix of chunks
    OpDef("attention_prefill", OpKind.ATTENTION, (6, 7), _attention_prefill),
    # (q [B, H, D], k_cache, v_cache, seq_lens, block_tables[, sinks]): one query per sequence
    OpDef("attention_decode", OpKind.ATTENTION, (5, 6), _attention_decode),
    # one kernel: `body` (a Graph whose inputs in0..inN are this node's inputs), `pattern`
    OpDef("fused", OpKind.FUSED, (1, 1 << 16), _fused),
]
OPS: dict[str, OpDef] = {op.name: op for op in _OPS}
