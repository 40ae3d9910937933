"""Constant folding and identity removal.

An elementwise op whose inputs are all `const` becomes one `const` (computed by the reference
interpreter, so folding cannot disagree with it); one whose inputs are dense weights and
constants becomes a derived weight (`ElementwiseWeights`, computed once when the artifact is
written, by the same reference). Ops that do nothing are dropped: a cast to
the same dtype, a reshape to the same shape, a slice of a whole dim, `x * 1`, `x + 0`, `x - 0`,
`x / 1` (when x already has the result's type); a reshape of a reshape reads the original.
Runs anywhere; the pipeline runs it in the canonicalize phase.
"""

from __future__ import annotations

import torch

from kiln.ir import OPS, Graph, GraphBuilder, Node, OpKind
from kiln.passes.context import PassContext
from kiln.passes.dce import eliminate_dead_code
from kiln.passes.derive import ElementwiseWeights, weight_expr

_NEUTRAL = {"mul": 1.0, "div": 1.0, "add": 0.0, "sub": 0.0}  # x op c == x
_COMMUTATIVE = ("mul", "add")


def _is_const(node: Node, value=None) -> bool:
    return node.op == "const" and (value is None or node.attrs["value"] == value)


def _identity(node: Node, inputs: tuple[Node, ...]) -> Node | None:
    """The input that `node` merely passes through, if any."""
    if not inputs:
        return None
    x = inputs[0]
    if node.op in ("cast", "reshape", "slice") and x.type == node.type:
        return x
    if node.op in _NEUTRAL:
        a, b = inputs
        if _is_const(b, _NEUTRAL[node.op]) and a.type == node.type:
            return a
        if node.op in _COMMUTATIVE and _is_const(a, _NEUTRAL[node.op]) and b.type == node.type:
            return b
    return None


def _is_dense_weight(node: Node) -> bool:
    return node.op == "param" and "quant" not in node.attrs


def _derived_weight(builder: GraphBuilder, node: Node, inputs: tuple[Node, ...]) -> Node:
    """The weight `node` computes from weights and constants, as a derived param."""
    parts = tuple(float(i.attrs["value"]) if _is_const(i) else weight_expr(i) for i in inputs)
    derive = ElementwiseWeights(node.op, parts, tuple(sorted(node.attrs.items())), node.type.dtype)
    return builder.param(str(derive), node.type, derive=derive)


def fold_constants(graph: Graph, ctx: PassContext | None = None) -> Graph:
    folded = 0

    def rewrite(builder: GraphBuilder, node: Node, inputs: tuple[Node, ...]) -> Node | None:
        nonlocal folded
        same = _identity(node, inputs)
        if same is not None:
            folded += 1
            return same
        if node.kind is OpKind.ELEMENTWISE and all(_is_const(i) for i in inputs):
            args = [torch.tensor(i.attrs["value"], dtype=i.type.torch_dtype) for i in inputs]
            value = OPS[node.op].reference(node, args, {}).to(node.type.torch_dtype).item()
            folded += 1
            return builder.op("const", value=value, dtype=node.type.dtype)
        if node.kind is OpKind.ELEMENTWISE and all(_is_const(i) or _is_dense_weight(i) for i in inputs) \
                and any(_is_dense_weight(i) for i in inputs):
            folded += 1
            return _derived_weight(builder, node, inputs)
        if node.op == "reshape" and inputs[0].op == "reshape":
            base = inputs[0].inputs[0]
            folded += 1
            return base if base.type == node.type else builder.op("reshape", base, **node.attrs)
        return None

    result = eliminate_dead_code(graph.rebuild(rewrite))  # the constants that were folded
    if ctx is not None and folded:
        ctx.note(f"folded {folded} constant or identity ops")
    return result
