"""The cost model of fusion: each op's role, the bytes a kernel moves, and kernel launch counts.

A kernel's traffic is the bytes it reads from outside (each distinct value once; a view reads
only its part; the KV cache and constants are not counted, since every grouping writes and
reads them alike) plus the bytes it writes for readers outside it. Fusing two kernels saves
traffic(a) + traffic(b) - traffic(a + b): the intermediate that is no longer written and read
back, and inputs both read. Byte counts are sympy expressions of T and B; decisions compare them
at the representative sizes of the PassContext.
"""

from __future__ import annotations

import re

import sympy

from kiln.ir import Graph, Node, OpKind
from kiln.ir.types import tensor_types
from kiln.passes.context import PassContext
from kiln.passes.graph_tools import is_compute, storage_source, users_through_views, view_root

# What an op does, for fusion: how it iterates and what may surround it in one kernel.
_ROLES = {
    OpKind.ELEMENTWISE: "pointwise",
    OpKind.POSITIONAL: "positional",  # rope: elementwise per row, but pairs channels half a head apart
    OpKind.STORE: "store",
    OpKind.REDUCTION: "reduction",
    OpKind.MATMUL: "matmul",
    OpKind.DATA: "gather",  # views (reshape, slice, get) never get a role: they are free
    OpKind.SHUFFLE: "shuffle",  # sort, topk, cat, gather: a kernel of its own
    OpKind.ATTENTION: "attention",
    OpKind.EXPERTS: "experts",  # moe: grouped GEMMs over routed tokens, a kernel family of its own
    OpKind.RECURRENT: "recurrent",  # linear attention, causal conv1d: a scan over each sequence's tokens
    OpKind.FUSED: "fused",
    OpKind.COLLECTIVE: "collective",  # all_reduce, all_gather: a call into the communication library
}
HEAVY = ("matmul", "attention", "reduction", "gather")  # a kernel is built around one of these


def role(node: Node) -> str:
    return _ROLES[node.kind]


def rows(node: Node) -> sympy.Expr:
    """The rows (tokens) a row-parallel kernel iterates over for `node`."""
    return (node.inputs[0] if role(node) == "store" else node).type.shape[0]


def value_bytes(node: Node) -> sympy.Expr:
    return sum((t.nbytes for t in tensor_types(node.type)), sympy.Integer(0))


def stored_in_state(node: Node) -> bool:
    """Whether `node`'s value lives in a state's storage (a KV-cache write returns its cache)."""
    source = storage_source(node)
    return source is not None and source.op == "state"


class TrafficModel:
    """Traffic of candidate kernels (sets of compute nodes) of one graph, at representative sizes."""

    def __init__(self, graph: Graph, ctx: PassContext):
        self.users, self.outputs = users_through_views(graph)
        self.ctx = ctx
        self._bytes: dict[Node, float] = {}

    def bytes(self, node: Node) -> float:
        if node not in self._bytes:
            self._bytes[node] = self.ctx.bytes(value_bytes(node))
        return self._bytes[node]

    def escapes(self, node: Node, members: frozenset[Node]) -> bool:
        """Whether `node`'s value is needed outside `members` (by another kernel or as an output)."""
        return node in self.outputs or any(u not in members for u in self.users[node])

    def traffic(self, members: frozenset[Node]) -> float:
        reads: set[Node] = set()
        written = 0.0
        for m in members:
            for i in m.inputs:
                root = view_root(i)
                if root not in members and root.op != "const" and not stored_in_state(root):
                    reads.add(i)
            if not stored_in_state(m) and self.escapes(m, members):
                written += self.bytes(m)
        return written + sum(self.bytes(i) for i in reads)

    def saved(self, a: frozenset[Node], b: frozenset[Node]) -> float:
        return self.traffic(a) + self.traffic(b) - self.traffic(a | b)


def launches(graph: Graph) -> int:
    """Kernel launches of one step: every compute node (a fused node is one kernel; views are free)."""
    return sum(1 for n in graph.nodes if is_compute(n))


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layers_read(node: Node) -> set[int | None]:
    """The decoder layers whose weights or KV cache `node` touches (None: a weight of no layer)."""
    body = node.attrs.get("body")
    found: set[int | None] = {n.attrs["layer"] for n in (node, *(body.nodes if body else ())) if "layer" in n.attrs}
    for i in node.inputs:
        if i.op == "param":
            match = _LAYER.search(i.name)
            found.add(int(match.group(1)) if match else None)
    return found


def layer_launches(graph: Graph) -> tuple[int, int, int]:
    """(launches inside the decoder layers, launches outside them, number of layers). A kernel
    is outside when the only weights it reads belong to no layer (embedding, final norm, LM
    head); every other kernel counts towards the layers, whose number is that of the distinct
    layer indices in weight names (`...layers.<i>...`) and `layer` attributes."""
    inside = outside = 0
    layers: set[int] = set()
    for node in (n for n in graph.nodes if is_compute(n)):
        read = _layers_read(node)
        layers |= {i for i in read if i is not None}
        if read == {None}:
            outside += 1
        else:
            inside += 1
    return inside, outside, len(layers)


def launches_per_layer(graph: Graph) -> float:
    """Kernel launches of the decoder layers divided by their number (see layer_launches)."""
    inside, _, layers = layer_launches(graph)
    return inside / layers if layers else 0.0
