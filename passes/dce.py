"""Dead-code elimination: drops every node that neither feeds an output nor writes state.

Kept regardless of use: nodes with side effects (attention before lowering, kv_write, a fused
node whose body writes the KV cache) and the graph's `input` and `state` sources, which are the
step's calling convention. Unused params and constants go. Runs anywhere; the pipeline runs it
first and again after each pass that leaves values behind (lowering, fusion).
"""

from __future__ import annotations

from kiln.ir import Graph, Node
from kiln.ir.graph import has_side_effects
from kiln.passes.context import PassContext


def eliminate_dead_code(graph: Graph, ctx: PassContext | None = None) -> Graph:
    roots = [n for n in graph.nodes if has_side_effects(n) or n.op in ("input", "state")]
    live: set[Node] = set()
    stack = [*graph.outputs.values(), *roots]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.inputs)
    dropped = len(graph.nodes) - len(live)
    if ctx is not None and dropped:
        ctx.note(f"removed {dropped} dead nodes")
    return Graph([n for n in graph.nodes if n in live], dict(graph.outputs), graph.name)
