"""Small graph queries shared by the passes: views and the users of a value seen through them."""

from __future__ import annotations

from kiln.ir import OPS, Graph, Node, OpKind


def is_view(node: Node) -> bool:
    return OPS[node.op].view


def view_root(node: Node) -> Node:
    """The node whose storage `node` views (itself unless it is a reshape/slice/get chain)."""
    while is_view(node):
        node = node.inputs[0]
    return node


def is_compute(node: Node) -> bool:
    """A node that does work (not a source, a constant or a view)."""
    return node.kind is not OpKind.SOURCE and not is_view(node)


def users_through_views(graph: Graph) -> tuple[dict[Node, list[Node]], set[Node]]:
    """For every node: the non-view nodes that read it, directly or through views (in graph
    order, each once); and the set of nodes that reach a graph output, directly or through views."""
    users: dict[Node, list[Node]] = {n: [] for n in graph.nodes}
    for node in graph.nodes:
        if is_view(node):
            continue
        for i in dict.fromkeys(node.inputs):
            for base in _view_chain(i):
                if node not in users[base]:
                    users[base].append(node)
    outputs = {b for out in graph.outputs.values() for b in _view_chain(out)}
    return users, outputs


def _view_chain(node: Node) -> list[Node]:
    chain = [node]
    while is_view(node):
        node = node.inputs[0]
        chain.append(node)
    return chain


def storage_source(node: Node, index: int = 0) -> Node | None:
    """The source (input, param, state) whose storage output `index` of `node` lives in, if any:
    follows views, `get`, ops that return an input's storage (a KV write returns its cache),
    and a fused node's body (a body output that is such an alias of a body input)."""
    while True:
        if node.op == "get":
            node, index = node.inputs[0], node.attrs["index"]
        elif node.op == "fused":
            body = node.attrs["body"]
            inner = storage_source(list(body.outputs.values())[index])
            if inner is None:
                return None
            node, index = node.inputs[body.inputs.index(inner)], 0
        elif OPS[node.op].aliases is not None:
            node = node.inputs[OPS[node.op].aliases]
        else:
            return node if node.op in ("input", "param", "state") else None
