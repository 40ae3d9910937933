"""Memory planning: every activation tensor gets a buffer, and buffers are reused by liveness.

A value is live from the node that computes it to its last reader (through views and `get`);
graph outputs live to the end. Walking the nodes in order, buffers of values past their last
use return to a free list, and each new value takes the smallest free buffer of its dtype that
is at least its size for every T and B (sizes are sympy expressions: the difference must be a
polynomial with no negative coefficient), else a new buffer. Values stored in a source (a KV
write returns its cache) need none.

The plan annotates the graph: `graph.buffers` lists the buffers as flat types (`f32[576*T]`)
and each compute node carries `buffer=` its buffer index (a tuple for a multi-output node, None
where the tensor lives in the KV cache). Peak activation memory is the buffers' total, a sympy
expression of T (mixed) or B (decode). Run last.
"""

from __future__ import annotations

import sympy

from kiln.ir import OPS, Graph, GraphBuilder, Node, TensorType
from kiln.ir.types import tensor_types
from kiln.passes.context import PassContext
from kiln.passes.graph_tools import is_compute, storage_source

Value = tuple[Node, int]  # a compute node and which of its outputs


def read_value(node: Node) -> Value | None:
    """The compute output that reading `node` reads (through views and `get`), if any."""
    index = 0
    while OPS[node.op].view:
        if node.op == "get":
            index = node.attrs["index"]
        node = node.inputs[0]
    return (node, index) if is_compute(node) else None


def live_ranges(graph: Graph) -> dict[Value, tuple[int, int]]:
    """(definition, last use) positions of every value that needs a buffer."""
    ranges: dict[Value, tuple[int, int]] = {}
    for pos, node in enumerate(graph.nodes):
        if is_compute(node):
            for index in range(len(tensor_types(node.type))):
                if storage_source(node, index) is None:
                    ranges[(node, index)] = (pos, pos)
        for i in node.inputs:
            value = read_value(i)
            if value in ranges:
                ranges[value] = (ranges[value][0], pos)
    for out in graph.outputs.values():
        value = read_value(out)
        if value in ranges:
            ranges[value] = (ranges[value][0], len(graph.nodes))
    return ranges


def fits(buffer: TensorType, t: TensorType) -> bool:
    """Whether `t` fits in `buffer` (same dtype, no more elements) for every positive T and B."""
    if buffer.dtype != t.dtype:
        return False
    spare = sympy.expand(buffer.numel - t.numel)
    if spare.is_number:
        return bool(spare >= 0)
    try:
        return all(c >= 0 for c in sympy.Poly(spare, *sorted(spare.free_symbols, key=str)).coeffs())
    except sympy.PolynomialError:
        return False


def _assign(graph: Graph, ctx: PassContext) -> tuple[dict[Value, int], list[TensorType]]:
    defined: dict[int, list[Value]] = {}
    released: dict[int, list[Value]] = {}  # after the node at this position ran
    for value, (start, end) in live_ranges(graph).items():
        defined.setdefault(start, []).append(value)
        released.setdefault(end, []).append(value)
    buffers: list[TensorType] = []
    free: list[int] = []
    assigned: dict[Value, int] = {}
    for pos in range(len(graph.nodes)):
        for node, index in defined.get(pos, []):
            t = tensor_types(node.type)[index]
            fitting = [b for b in free if fits(buffers[b], t)]
            if fitting:
                best = min(fitting, key=lambda b: ctx.bytes(buffers[b].nbytes))
                free.remove(best)
            else:
                best = len(buffers)
                buffers.append(TensorType((t.numel,), t.dtype))
            assigned[(node, index)] = best
        free += [assigned[v] for v in released.get(pos, [])]
    return assigned, buffers


def plan_memory(graph: Graph, ctx: PassContext | None = None) -> Graph:
    ctx = ctx or PassContext()
    assigned, buffers = _assign(graph, ctx)

    def rewrite(builder: GraphBuilder, node: Node, inputs: tuple[Node, ...]) -> Node | None:
        if not is_compute(node):
            return None
        slots = tuple(assigned.get((node, i)) for i in range(len(tensor_types(node.type))))
        return builder.op(node.op, *inputs, **{**node.attrs, "buffer": slots if len(slots) > 1 else slots[0]})

    planned = graph.rebuild(rewrite)
    planned = Graph(planned.nodes, planned.outputs, planned.name, tuple(buffers))
    peak = peak_activation_bytes(planned)
    unshared = sympy.expand(sum((tensor_types(n.type)[i].nbytes for n, i in assigned), sympy.Integer(0)))
    ctx.note(f"{len(buffers)} buffers for {len(assigned)} activation tensors: peak {peak} bytes "
             f"({ctx.bytes(peak) / 1e6:.2f} MB at the representative sizes; {unshared} without reuse)")
    return planned


def peak_activation_bytes(graph: Graph) -> sympy.Expr:
    """The planned activation memory: the total size of the graph's buffers."""
    return sympy.expand(sum((b.nbytes for b in graph.buffers), sympy.Integer(0)))
