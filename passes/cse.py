"""Common-subexpression elimination: two nodes with the same op, inputs and attributes become one.

Nodes with side effects are never merged (two KV writes are two writes). Runs anywhere; the
pipeline runs it after dead-code elimination, before weight packing (so that two identical
linears are not packed as two).
"""

from __future__ import annotations

from kiln.ir import Graph, GraphBuilder, Node
from kiln.ir.graph import has_side_effects
from kiln.passes.context import PassContext


def _key(node: Node, inputs: tuple[Node, ...]):
    """A hashable identity of the computation, or None if it must stay distinct."""
    if has_side_effects(node):
        return None
    try:
        attrs = tuple(sorted(node.attrs.items()))
        hash(attrs)
    except TypeError:  # an unhashable attribute (a fused body): keep the node
        return None
    return node.op, inputs, attrs


def eliminate_common_subexpressions(graph: Graph, ctx: PassContext | None = None) -> Graph:
    seen: dict[tuple, Node] = {}
    merged = 0

    def rewrite(builder: GraphBuilder, node: Node, inputs: tuple[Node, ...]) -> Node:
        nonlocal merged
        key = _key(node, inputs)
        if key is not None and key in seen:
            merged += 1
            return seen[key]
        new = builder.copy(node, inputs)
        if key is not None:
            seen[key] = new
        return new

    result = graph.rebuild(rewrite)
    if ctx is not None and merged:
        ctx.note(f"merged {merged} repeated computations")
    return result
