"""Nodes and graphs.

A `Node` is one op applied to earlier nodes; its `type` is inferred when it is built. A `Graph`
is a list of nodes in topological order plus named outputs. Source nodes (`input`, `param`,
`state`) carry a unique `name`: the step input, the weight, or the KV-cache buffer they stand
for. Passes never mutate a graph: they build a new one (`GraphBuilder`, `Graph.rebuild`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import MappingProxyType

from kiln.ir.ops import OPS, OpKind
from kiln.ir.types import TensorType, TupleType


class Node:
    """`op(inputs..., **attrs) : type`. Compared by identity."""

    __slots__ = ("op", "inputs", "attrs", "type")

    def __init__(self, op: str, inputs: Iterable[Node], attrs: dict, type: TensorType | TupleType):
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = MappingProxyType(dict(attrs))
        self.type = type

    @property
    def name(self) -> str | None:
        """The source name of an input/param/state node, else None."""
        return self.attrs.get("name")

    @property
    def kind(self) -> OpKind:
        return OPS[self.op].kind

    def __repr__(self) -> str:
        label = f" {self.name}" if self.name else ""
        return f"<Node {self.op}{label} : {self.type}>"


def infer_type(op: str, inputs: Iterable[Node], attrs: dict) -> TensorType | TupleType:
    """The output type of `op` on `inputs` (raises op_types.TypeError_ or KeyError for an unknown op)."""
    return OPS[op].infer([n.type for n in inputs], attrs)


def has_side_effects(node: Node) -> bool:
    """Whether `node` writes state (an op marked side_effects, or a fused body holding one)."""
    if OPS[node.op].side_effects:
        return True
    body = node.attrs.get("body")
    return body is not None and any(has_side_effects(n) for n in body.nodes)


@dataclass
class Graph:
    """Nodes in topological order (sources included) and named outputs. `buffers` is the memory
    plan (passes/plan_memory): flat activation buffers, e.g. `f32[576*T]`, that nodes name by
    index in their `buffer` attribute; empty until memory is planned."""

    nodes: list[Node]
    outputs: dict[str, Node]
    name: str = "step"
    buffers: tuple[TensorType, ...] = ()

    def sources(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    @property
    def inputs(self) -> list[Node]:
        return self.sources("input")

    @property
    def params(self) -> list[Node]:
        return self.sources("param")

    @property
    def states(self) -> list[Node]:
        return self.sources("state")

    def users(self) -> dict[Node, list[Node]]:
        """Map each node to the nodes that read it (in order, repeated if read twice)."""
        users: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                users[i].append(n)
        return users

    def rebuild(self, rewrite: Callable[[GraphBuilder, Node, tuple[Node, ...]], Node | None]) -> Graph:
        """A new graph: each node (in order) is offered to `rewrite(builder, node, new_inputs)`,
        which returns its replacement or None to copy it unchanged. Outputs follow the mapping."""
        builder = GraphBuilder(self.name)
        mapping: dict[Node, Node] = {}
        for node in self.nodes:
            new_inputs = tuple(mapping[i] for i in node.inputs)
            replacement = rewrite(builder, node, new_inputs)
            mapping[node] = replacement if replacement is not None else builder.copy(node, new_inputs)
        for out_name, node in self.outputs.items():
            builder.output(out_name, mapping[node])
        return builder.build()


@dataclass
class GraphBuilder:
    """Appends nodes in order, inferring each type; sources are unique by (op, name)."""

    name: str = "step"
    nodes: list[Node] = field(default_factory=list)
    outputs: dict[str, Node] = field(default_factory=dict)
    _sources: dict[tuple[str, str], Node] = field(default_factory=dict)

    def source(self, op: str, name: str, type: TensorType, **extra) -> Node:
        """The source `name`; `extra` attributes describe it further (a derived param's `derive`)."""
        key = (op, name)
        attrs = {"name": name, "type": type, **extra}
        if key in self._sources:
            if dict(self._sources[key].attrs) != attrs:
                raise ValueError(f"{op} {name!r} declared twice: {dict(self._sources[key].attrs)} and {attrs}")
            return self._sources[key]
        node = Node(op, (), attrs, type)
        self._sources[key] = node
        self.nodes.append(node)
        return node

    def input(self, name: str, type: TensorType) -> Node:
        return self.source("input", name, type)

    def param(self, name: str, type: TensorType, **extra) -> Node:
        return self.source("param", name, type, **extra)

    def state(self, name: str, type: TensorType) -> Node:
        return self.source("state", name, type)

    def op(self, op: str, *inputs: Node, **attrs) -> Node:
        node = Node(op, inputs, attrs, infer_type(op, inputs, attrs))
        self.nodes.append(node)
        return node

    def copy(self, node: Node, inputs: tuple[Node, ...]) -> Node:
        """`node` re-created here on `inputs` (sources deduplicated by name)."""
        if not inputs and node.name is not None:
            extra = {k: v for k, v in node.attrs.items() if k not in ("name", "type")}
            return self.source(node.op, node.name, node.type, **extra)
        return self.op(node.op, *inputs, **node.attrs)

    def output(self, name: str, node: Node) -> None:
        self.outputs[name] = node

    def build(self) -> Graph:
        return Graph(list(self.nodes), dict(self.outputs), self.name)
