"""Weight packing: linears that read the same input become one linear over a packed weight,
followed by one column slice per original linear (q/k/v -> qkv, gate/up -> gate_up).

The packed weight is a derived param (`derive=ConcatWeights(...)`, see derive.py); no tensor is
touched. Linears pack only if their weights (and biases) share a dtype and a quantization format
(quantized rows concatenate exactly) and either all or none has a bias; a refused group is
noted with the reason. Run after CSE (identical linears are one linear by then); a spec that
packs its weights itself (kiln's Llama spec) leaves nothing to do.
"""

from __future__ import annotations

from kiln.ir import Graph, GraphBuilder, Node, TensorType
from kiln.passes.context import PassContext
from kiln.passes.dce import eliminate_dead_code
from kiln.passes.derive import ConcatWeights, packed_name, weight_expr


def _packable_groups(graph: Graph, ctx: PassContext) -> list[list[Node]]:
    by_input: dict[Node, list[Node]] = {}
    for node in graph.nodes:
        if node.op == "linear" and all(w.op == "param" for w in node.inputs[1:]):
            by_input.setdefault(node.inputs[0], []).append(node)
    groups = []
    for linears in by_input.values():
        if len(linears) < 2:
            continue
        names = ", ".join(lin.inputs[1].name for lin in linears)
        if len({len(lin.inputs) for lin in linears}) > 1:
            ctx.note(f"not packed ({names}): some have a bias and some do not")
        elif len({lin.inputs[1].type.dtype for lin in linears}) > 1:
            ctx.note(f"not packed ({names}): their weights differ in dtype")
        elif len({lin.inputs[1].attrs.get("quant") for lin in linears}) > 1:
            ctx.note(f"not packed ({names}): their weights differ in quantization format")
        else:
            groups.append(linears)
    return groups


def _packed_param(builder: GraphBuilder, params: list[Node]) -> Node:
    rows = sum(int(p.type.shape[0]) for p in params)
    shape = (rows, *params[0].type.shape[1:])
    derive = ConcatWeights(tuple(weight_expr(p) for p in params), dim=0)
    quant = {"quant": params[0].attrs["quant"]} if "quant" in params[0].attrs else {}
    return builder.param(packed_name([p.name for p in params]), TensorType(shape, params[0].type.dtype), derive=derive,
                         **quant)


def pack_weights(graph: Graph, ctx: PassContext | None = None) -> Graph:
    ctx = ctx or PassContext()
    groups = _packable_groups(graph, ctx)
    first_of = {group[0]: group for group in groups}
    replaced: dict[Node, Node] = {}  # original linear -> its slice of the packed output (new graph)

    def rewrite(builder: GraphBuilder, node: Node, inputs: tuple[Node, ...]) -> Node | None:
        if node in replaced:
            return replaced[node]
        if node not in first_of:
            return None
        group = first_of[node]
        weights = [_packed_param(builder, [lin.inputs[i] for lin in group]) for i in range(1, len(node.inputs))]
        packed = builder.op("linear", inputs[0], *weights)
        dim, start = packed.type.rank - 1, 0
        for lin in group:
            stop = start + int(lin.type.shape[-1])
            replaced[lin] = builder.op("slice", packed, dim=dim, start=start, stop=stop)
            start = stop
        ctx.note(f"packed {len(group)} linears into {weights[0].name}")
        return replaced[node]

    return eliminate_dead_code(graph.rebuild(rewrite))  # the unpacked weights are no longer read
