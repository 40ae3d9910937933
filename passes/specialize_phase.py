"""Phase specialisation: the decode graph knows that every sequence brings one token, so the
token count T equals the batch size B; every `T` in its types and shape attributes becomes `B`.

The mixed graph is left general (any mix of prefill chunks and decodes). Decode kernels can then
size everything by B (q: [B, H, D]), and the decode memory plan is a function of B alone. Run
before lower_attention, which picks the decode attention op for this phase.
"""

from __future__ import annotations

import sympy

from kiln.ir import B, Graph, GraphBuilder, Node, T
from kiln.passes.context import PassContext


def _substitute(value, bindings: dict):
    if isinstance(value, sympy.Expr):
        return value.subs(bindings)
    if isinstance(value, tuple):
        return tuple(_substitute(v, bindings) for v in value)
    return value


def specialize_phase(graph: Graph, ctx: PassContext | None = None) -> Graph:
    ctx = ctx or PassContext()
    if ctx.phase != "decode":
        return Graph(list(graph.nodes), dict(graph.outputs), f"{graph.name}_{ctx.phase}")
    bindings = {T: B}

    def rewrite(builder: GraphBuilder, node: Node, inputs: tuple[Node, ...]) -> Node | None:
        if node.name is not None and not inputs:
            extra = {k: v for k, v in node.attrs.items() if k not in ("name", "type")}
            t = node.type
            return builder.source(node.op, node.name, t.with_shape(_substitute(t.shape, bindings)), **extra)
        return builder.op(node.op, *inputs, **{k: _substitute(v, bindings) for k, v in node.attrs.items()})

    result = graph.rebuild(rewrite)
    ctx.note("decode phase: one token per sequence, T = B")
    return Graph(result.nodes, result.outputs, f"{graph.name}_decode")
