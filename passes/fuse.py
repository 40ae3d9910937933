"""Fusion: groups compute nodes into kernels, greedily by memory traffic saved, and replaces each
group of two or more nodes by one `fused` node.

Decisions: every pair of kernels that touch (one reads the other's output, or both read the same
value) is a candidate. The candidate saving the most bytes (cost.TrafficModel at the
representative sizes; ties go to merges with fewer heavy ops, then to the earlier nodes) is
merged if fusion_rules allows the merged set and the merge creates no cycle between kernels;
repeat until no candidate saves bytes. Every candidate left apart is noted with its reason, so
the dump shows why (e.g. "value %4 is needed by two reductions").

The fused form (what codegen consumes; see fuse_emit.py):
    %7 = fused(%3, @w, %positions, ..., body=k2_linear, pattern=rms_norm > linear > silu, mul) : f32[T, 1536]
the node's inputs are the kernel's arguments (materialized tensors, weights, step inputs, KV
caches), `body` a Graph whose inputs in0..inN stand for them in order and whose outputs
out0..outM are the kernel's outputs (a TupleType node read with `get` when M > 0), `pattern` a
FusionPattern (anchor op, prologue ops, epilogue ops). Views (reshape, slice) between kernels
are copied into the reading body, so a body input is always a whole tensor. A node alone in its
group stays a plain op. Run after lower_attention (so KV writes can join the rope kernel) and
fold_norm_weights.
"""

from __future__ import annotations

import heapq

from kiln.ir import B, Graph, Node, T
from kiln.ir.printer import node_names
from kiln.passes.context import PassContext
from kiln.passes.cost import HEAVY, TrafficModel, launches, role
from kiln.passes.fuse_emit import emit_groups
from kiln.passes.fusion_rules import GroupView, refusal
from kiln.passes.graph_tools import is_compute, view_root


class _Grouping:
    """Kernels as sets of compute nodes, each keyed by its first member."""

    def __init__(self, graph: Graph, ctx: PassContext):
        self.nodes = graph.nodes
        position = {n: i for i, n in enumerate(graph.nodes)}
        self.view = GroupView(TrafficModel(graph, ctx), node_names(graph), position, ctx.kernel_check)
        self.traffic, self.position = self.view.traffic, position
        self.key = {n: n for n in graph.nodes if is_compute(n)}
        self.members = {n: frozenset([n]) for n in self.key}

    def producers(self, g: Node) -> set[Node]:
        return {self.key[r] for m in self.members[g] for r in map(view_root, m.inputs) if r in self.key} - {g}

    def consumers(self, g: Node) -> set[Node]:
        return {self.key[u] for m in self.members[g] for u in self.traffic.users[m]} - {g}

    def siblings(self, g: Node) -> set[Node]:
        """Kernels that read a computed value this kernel also reads."""
        roots = {r for m in self.members[g] for r in map(view_root, m.inputs) if r in self.key and self.key[r] != g}
        return {self.key[u] for r in roots for u in self.traffic.users[r]} - {g}

    def candidates(self, g: Node) -> set[Node]:
        return self.producers(g) | self.consumers(g) | self.siblings(g)

    def cycle_through(self, a: Node, b: Node) -> Node | None:
        """A kernel on a path between a and b (merging them would make a cycle), or None."""
        for src, dst in ((a, b), (b, a)):
            limit = max(self.position[m] for m in self.members[dst])
            stack = [g for g in self.consumers(src) if g is not dst]
            seen = set(stack)
            while stack:
                g = stack.pop()
                if self.position[g] > limit:
                    continue
                nxt = self.consumers(g)
                if dst in nxt:
                    return g
                stack += [s for s in nxt if s not in seen]
                seen.update(nxt)
        return None

    def refusal(self, a: Node, b: Node) -> str | None:
        why = refusal(self.members[a] | self.members[b], self.view)
        if why is None and self.saved(a, b) <= 0:
            why = "saves no memory traffic"
        if why is None and (via := self.cycle_through(a, b)) is not None:
            why = f"would create a cycle through {self.view.show(via)}"
        return why

    def saved(self, a: Node, b: Node) -> float:
        return self.traffic.saved(self.members[a], self.members[b])

    def priority(self, a: Node, b: Node) -> tuple:
        heavy = sum(1 for m in self.members[a] | self.members[b] if role(m) in HEAVY)
        a, b = sorted((a, b), key=self.position.__getitem__)
        return -self.saved(a, b), heavy, self.position[a], self.position[b]

    def merge(self, a: Node, b: Node) -> Node:
        key = min(a, b, key=self.position.__getitem__)
        merged = self.members.pop(a) | self.members.pop(b)
        self.members[key] = merged
        for m in merged:
            self.key[m] = key
        return key

    def show(self, g: Node) -> str:
        return " + ".join(self.view.show(m) for m in sorted(self.members[g], key=self.position.__getitem__))


def _group(graph: Graph, ctx: PassContext) -> list[frozenset[Node]]:
    grouping = _Grouping(graph, ctx)
    steps = {s for n in graph.inputs for d in n.type.shape for s in d.free_symbols} & {T, B}
    ctx.note(f"memory traffic saved by each fusion, at {', '.join(f'{s}={ctx.sizes[s]}' for s in sorted(steps, key=str))}:")
    heap = [grouping.priority(a, b) for a in grouping.members for b in grouping.candidates(a)
            if grouping.position[a] < grouping.position[b]]
    heapq.heapify(heap)
    while heap:
        entry = heapq.heappop(heap)
        a, b = grouping.key[grouping.nodes[entry[2]]], grouping.key[grouping.nodes[entry[3]]]
        if a is b:
            continue
        current = grouping.priority(a, b)
        if current != entry:  # the kernels grew since this entry was pushed: re-rank
            heapq.heappush(heap, current)
            continue
        if grouping.refusal(a, b) is not None:
            continue
        ctx.note(f"fuse {grouping.show(a)} | {grouping.show(b)}: saves {-entry[0] / 1e6:.3f} MB")
        merged = grouping.merge(a, b)
        for other in grouping.candidates(merged):
            heapq.heappush(heap, grouping.priority(merged, other))
    _note_refusals(grouping, ctx)
    return sorted(grouping.members.values(), key=lambda g: min(grouping.position[m] for m in g))


def _note_refusals(grouping: _Grouping, ctx: PassContext) -> None:
    for a in sorted(grouping.members, key=grouping.position.__getitem__):
        for b in sorted(grouping.candidates(a), key=grouping.position.__getitem__):
            if grouping.position[a] < grouping.position[b]:
                ctx.note(f"kept apart {grouping.show(a)} | {grouping.show(b)}: {grouping.refusal(a, b)}")


def fuse(graph: Graph, ctx: PassContext | None = None) -> Graph:
    ctx = ctx or PassContext()
    groups = _group(graph, ctx)
    fused = emit_groups(graph, groups)
    ctx.note(f"launches: {launches(graph)} before fusion, {launches(fused)} after")
    return fused
