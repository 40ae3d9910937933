"""Row-gather sinking: `gather_rows(f(x), idx)` becomes `f(gather_rows(x, idx))` when f works
row by row and its result is read only by the gather.

The step gathers each sequence's last token before the LM head; moving the gather above the
final norm makes the norm run on B rows instead of T, and puts norm and gather next to the
LM head's matmul, whose prologue can absorb both. f qualifies when it is an rms_norm or an
elementwise op and exactly one of its inputs carries the rows (the others are broadcast along
them: weights, constants). Repeats until no gather can move. Run after canonicalization.
"""

from __future__ import annotations

from kiln.ir import Graph, GraphBuilder, Node, OpKind
from kiln.passes.context import PassContext
from kiln.passes.dce import eliminate_dead_code


def _row_operand(node: Node) -> int | None:
    """The index of the one input of a row-wise `node` that has the rows, else None."""
    if node.kind not in (OpKind.ELEMENTWISE, OpKind.REDUCTION) or node.type.rank < 2:
        return None
    rows = [i for i, x in enumerate(node.inputs) if x.type.rank == node.type.rank and x.type.shape[0] == node.type.shape[0]]
    others_broadcast = all(x.type.rank < node.type.rank for i, x in enumerate(node.inputs) if i not in rows)
    return rows[0] if len(rows) == 1 and others_broadcast else None


def _sink_once(graph: Graph, ctx: PassContext) -> tuple[Graph, bool]:
    users = graph.users()
    movable = {n for n in graph.nodes if n.op == "gather_rows" and _row_operand(n.inputs[0]) is not None
               and len(users[n.inputs[0]]) == 1 and n.inputs[0] not in graph.outputs.values()}

    def rewrite(builder: GraphBuilder, node: Node, inputs: tuple[Node, ...]) -> Node | None:
        if node not in movable:
            return None
        op_node = node.inputs[0]
        at = _row_operand(op_node)
        assert at is not None  # `movable` holds only gathers of row-wise ops
        f_inputs = list(inputs[0].inputs)
        f_inputs[at] = builder.op("gather_rows", f_inputs[at], inputs[1])
        ctx.note(f"moved a row gather above {op_node.op}: it now runs on {node.type.shape[0]} rows")
        return builder.op(op_node.op, *f_inputs, **op_node.attrs)

    if not movable:
        return graph, False
    return eliminate_dead_code(graph.rebuild(rewrite)), True  # drops the ops that ran before their gather


def sink_row_gather(graph: Graph, ctx: PassContext | None = None) -> Graph:
    ctx = ctx or PassContext()
    moved = True
    while moved:
        graph, moved = _sink_once(graph, ctx)
    return graph
