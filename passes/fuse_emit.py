"""Builds the fused graph from kernel groups: one `fused` node per group of two or more compute
nodes (see fuse.py for the form), plain ops for the rest, views re-created where plain ops or
outputs read them.

Kernels are emitted in dependency order (ties by their first node), so the result is
topological whatever the groups' shapes. Inside a body, members keep their original order;
constants and the views between the kernel's inputs and its members are copied in.
"""

from __future__ import annotations

import heapq

from kiln.ir import FusionPattern, Graph, GraphBuilder, Node
from kiln.passes.cost import HEAVY, role
from kiln.passes.dce import eliminate_dead_code
from kiln.passes.fusion_rules import ancestors
from kiln.passes.graph_tools import is_compute, users_through_views, view_root
from kiln.passes.kernel_body import kernel_body

_ANCHOR_ORDER = ("matmul", "attention", "reduction", "gather")  # which heavy op names a kernel


def pattern_of(members: list[Node]) -> FusionPattern:
    """Anchor, prologue (its member ancestors) and epilogue (the rest), in member order."""
    group = frozenset(members)
    heavy = sorted((m for m in members if role(m) in HEAVY), key=lambda m: _ANCHOR_ORDER.index(role(m)))
    if not heavy:
        return FusionPattern(None, (), tuple(m.op for m in members))
    anchor = heavy[0]
    before = ancestors(anchor, group)
    return FusionPattern(anchor.op, tuple(m.op for m in members if m in before),
                         tuple(m.op for m in members if m not in before and m is not anchor))


def _order(graph: Graph, groups: list[frozenset[Node]]) -> list[list[Node]]:
    """The groups (members in graph order) in a dependency order."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    index = {m: gi for gi, g in enumerate(groups) for m in g}
    deps = [{index[r] for m in g for r in map(view_root, m.inputs) if r in index} - {gi} for gi, g in enumerate(groups)]
    dependents: list[set[int]] = [set() for _ in groups]
    for gi, ds in enumerate(deps):
        for d in ds:
            dependents[d].add(gi)
    first = [min(position[m] for m in g) for g in groups]
    ready = [(first[gi], gi) for gi, ds in enumerate(deps) if not ds]
    heapq.heapify(ready)
    ordered = []
    while ready:
        _, gi = heapq.heappop(ready)
        ordered.append(sorted(groups[gi], key=position.__getitem__))
        for d in dependents[gi]:
            deps[d].discard(gi)
            if not deps[d]:
                heapq.heappush(ready, (first[d], d))
    assert len(ordered) == len(groups), "fusion groups form a cycle"
    return ordered


def emit_groups(graph: Graph, groups: list[frozenset[Node]]) -> Graph:
    users, outputs = users_through_views(graph)
    b = GraphBuilder(graph.name)
    value: dict[Node, Node] = {}

    def read(node: Node) -> Node:
        if node not in value:
            assert not is_compute(node), f"{node} is read before its kernel ran"
            value[node] = b.copy(node, tuple(read(i) for i in node.inputs))
        return value[node]

    for k, members in enumerate(_order(graph, groups)):
        if len(members) == 1:
            (m,) = members
            value[m] = b.op(m.op, *(read(i) for i in m.inputs), **m.attrs)
            continue
        group = frozenset(members)
        escaping = [m for m in members if m in outputs or any(u not in group for u in users[m])]
        pattern = pattern_of(members)
        body, outer = kernel_body(f"k{k}_{pattern.anchor or 'rows'}", members, escaping)
        node = b.op("fused", *(read(o) for o in outer), body=body, pattern=pattern)
        for j, m in enumerate(escaping):
            value[m] = node if len(escaping) == 1 else b.op("get", node, index=j)
    for name, out in graph.outputs.items():
        b.output(name, read(out))
    return eliminate_dead_code(b.build())  # views that only fused bodies read
