"""The verifier: rejects malformed graphs with a message naming the offending node.

Checks: known ops and arity; inputs defined earlier in the graph (topological order, no
dangling references); recorded types equal re-inferred types; unique source names; outputs that
are nodes of the graph; a `fused` node's body is verified the same way (its inputs and outputs
must match the node, which its type rule checks); a node's `buffer` names buffers of the memory
plan. Run between passes in debug mode.
"""

from __future__ import annotations

from kiln.ir.graph import Graph, Node, infer_type
from kiln.ir.op_types import TypeError_
from kiln.ir.ops import OPS
from kiln.ir.printer import format_node, node_names
from kiln.ir.types import tensor_types


class VerifyError(Exception):
    """A malformed graph (a compiler bug, not a user error)."""


def verify(graph: Graph) -> None:
    names = node_names(graph)
    seen: set[Node] = set()
    sources: dict[tuple[str, str], Node] = {}

    def fail(node: Node, why: str):
        try:
            text = format_node(node, names)
        except KeyError:
            text = repr(node)
        raise VerifyError(f"in graph {graph.name!r}, node `{text}`: {why}")

    for node in graph.nodes:
        if node in seen:
            fail(node, "appears twice in the node list")
        if node.op not in OPS:
            fail(node, f"unknown op {node.op!r}")
        lo, hi = OPS[node.op].arity
        if not lo <= len(node.inputs) <= hi:
            fail(node, f"{node.op} takes {lo}..{hi} inputs, got {len(node.inputs)}")
        for i in node.inputs:
            if i not in seen:
                where = "later in the graph" if i in names else "outside the graph"
                fail(node, f"reads {i!r}, defined {where}")
        if node.name is not None:
            key = (node.op, node.name)
            if key in sources:
                fail(node, f"{node.op} name {node.name!r} is declared twice")
            sources[key] = node
        try:
            inferred = infer_type(node.op, node.inputs, node.attrs)
        except (TypeError_, KeyError) as e:
            fail(node, f"ill-typed: {e}")
        if inferred != node.type:
            fail(node, f"recorded type {node.type} but its inputs give {inferred}")
        if isinstance(node.attrs.get("body"), Graph):
            try:
                verify(node.attrs["body"])
            except VerifyError as e:
                fail(node, f"bad body: {e}")
        if "buffer" in node.attrs:
            _check_buffers(node, graph, fail)
        seen.add(node)
    for out_name, node in graph.outputs.items():
        if node not in seen:
            raise VerifyError(f"in graph {graph.name!r}, output {out_name!r} is not a node of the graph")


def _check_buffers(node: Node, graph: Graph, fail) -> None:
    """`buffer` is one buffer index per tensor the node produces (an int, or a tuple for a
    multi-output node), None where the tensor lives in a source's storage (a KV-cache write)."""
    slots = node.attrs["buffer"] if isinstance(node.attrs["buffer"], tuple) else (node.attrs["buffer"],)
    types = tensor_types(node.type)
    if len(slots) != len(types):
        fail(node, f"buffer {node.attrs['buffer']} does not give one buffer per output")
    for slot, t in zip(slots, types):
        if slot is not None and not (0 <= slot < len(graph.buffers) and graph.buffers[slot].dtype == t.dtype):
            fail(node, f"buffer {slot} is not a {t.dtype} buffer of the plan ({len(graph.buffers)} buffers)")
