"""The body of a kernel: a Graph whose inputs in0..inN stand for the values the kernel reads
(materialized tensors, weights, step inputs, KV caches, elements of multi-output values: the
`get` of a tuple is a kernel input, not a view inside the body; one that stands for a quantized
weight carries its `quant` format) and whose outputs out0..outM are the
values it writes for readers outside it. Fusion emits it as a `fused` node's body, and asks the
target about candidate bodies before it forms a group."""

from __future__ import annotations

from kiln.ir import Graph, GraphBuilder, Node
from kiln.passes.graph_tools import is_view


def kernel_body(name: str, members: list[Node], escaping: list[Node]) -> tuple[Graph, list[Node]]:
    """The body graph of a kernel and the outer nodes its inputs in0..inN stand for."""
    b = GraphBuilder(name)
    value: dict[Node, Node] = {}
    outer: list[Node] = []

    def read(node: Node) -> Node:
        if node not in value:
            if node.op == "const":
                value[node] = b.op("const", **node.attrs)
            elif is_view(node) and node.op != "get":  # an element of a tuple (topk's values) is read as a tensor
                value[node] = b.op(node.op, read(node.inputs[0]), **node.attrs)
            else:  # a quantized weight's input carries its format: the target's check may ask (codegen/kernel_check.py)
                quant = {"quant": node.attrs["quant"]} if node.op == "param" and "quant" in node.attrs else {}
                value[node] = b.source("input", f"in{len(outer)}", node.type, **quant)
                outer.append(node)
        return value[node]

    for m in members:
        value[m] = b.op(m.op, *(read(i) for i in m.inputs), **m.attrs)
    for j, m in enumerate(escaping):
        b.output(f"out{j}", value[m])
    return b.build(), outer
