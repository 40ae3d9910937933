"""Which compute nodes may share one kernel: rules over op roles (cost.role), not op names.

A kernel is built around at most one heavy op (its anchor), with the light ops around it:
  - attention runs alone (its tiles are query blocks x heads, not rows), and so does a node
    that is already fused;
  - a matmul kernel holds one matmul. Its prologue (ops that feed its x operand) is recomputed
    for every output tile, so prologue values may not be needed elsewhere; the prologue may hold
    elementwise ops, a row gather and one rms_norm that reads straight into x (the GEMM
    accumulates the row's sum of squares along K and scales its output rows at the end). Its
    epilogue (ops after it) is elementwise only: bias, activations, SiLU*mul over a packed
    gate/up output, a residual add;
  - any other kernel is row-parallel: one program per row (token), all ops over the same rows,
    at most one reduction (it may write several outputs: a residual sum and its norm), a gather
    only as the first op, and rope and KV writes freely.
The rules above up to "one matmul" hold for every target. With a target's kernel check
(`view.kernel_check`), the rest is the target's to say: fusion builds the candidate kernel's body
and asks it. Without one (tests of the pass alone), the template-specific rules below apply.
`refusal(members, view)` returns why a set of nodes cannot be one kernel, or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kiln.ir import Node
from kiln.passes.context import KernelCheck
from kiln.passes.cost import TrafficModel, role, rows
from kiln.passes.graph_tools import view_root
from kiln.passes.kernel_body import kernel_body


@dataclass
class GroupView:
    """What the rules need to know about the graph: users (through views), printable names,
    each node's position (for a stable order), and the target's kernel check, if any."""

    traffic: TrafficModel
    names: dict[Node, str]
    position: dict[Node, int]
    kernel_check: KernelCheck | None = None

    def show(self, node: Node) -> str:
        return f"{self.names[node]} {node.op}"


def member_inputs(node: Node, members: frozenset[Node]) -> list[Node]:
    """The members that `node` reads, directly or through views."""
    return [r for r in (view_root(i) for i in node.inputs) if r in members]


def ancestors(node: Node, members: frozenset[Node]) -> set[Node]:
    """The members that `node` depends on, through other members."""
    seen: set[Node] = set()
    stack = member_inputs(node, members)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(member_inputs(n, members))
    return seen


_ALONE = {  # roles that are a kernel on their own, and why
    "fused": "is already a kernel",
    "shuffle": "runs as its own kernel (it moves values across its dim)",
    "attention": "runs as its own kernel (its tiles are query blocks x heads)",
    "experts": "runs as its own kernels (tokens sorted by expert, grouped GEMMs)",
    "recurrent": "runs as its own kernel (a scan over each sequence's tokens with its state)",
    "collective": "runs alone (it exchanges values between the ranks)",
}


def refusal(members: frozenset[Node], view: GroupView) -> str | None:
    nodes = sorted(members, key=view.position.__getitem__)
    alone = [n for n in nodes if role(n) in _ALONE]
    if alone and len(nodes) > 1:
        return f"{view.show(alone[0])} {_ALONE[role(alone[0])]}"
    row_counts = sorted({str(rows(n)) for n in nodes})
    if len(row_counts) > 1:
        return f"its ops run over different rows ({' vs '.join(row_counts)})"
    matmuls = [n for n in nodes if role(n) == "matmul"]
    if len(matmuls) > 1:
        a, b = matmuls[:2]
        if a in ancestors(b, members) or b in ancestors(a, members):
            first, second = (a, b) if a in ancestors(b, members) else (b, a)
            return f"would recompute matmul {view.show(first)} in every output tile of {view.show(second)}"
        return f"one kernel holds one matmul ({view.show(a)}, {view.show(b)})"
    if view.kernel_check is not None:
        escaping = [n for n in nodes if view.traffic.escapes(n, members)]
        body, _ = kernel_body("candidate", nodes, escaping)
        return view.kernel_check(body)
    if matmuls:
        return _matmul_refusal(matmuls[0], members, view)
    return _row_kernel_refusal(nodes, members, view)


_PROLOGUE_ROLES = ("pointwise", "gather", "reduction")
_EPILOGUE_REASONS: dict[str, Callable[[str, str], str]] = {
    "reduction": lambda e, m: f"{e} reduces over the output row of {m}: a GEMM tile holds only part of a row",
    "positional": lambda e, m: f"{e} pairs channels half a head apart: a GEMM output tile does not hold whole heads",
    "store": lambda e, m: f"{e} is not a matmul epilogue (epilogues are elementwise); it runs with the rope kernel",
    "gather": lambda e, m: f"{e} cannot follow {m} in one kernel (a gather must read its table directly)",
}


def _matmul_refusal(m: Node, members: frozenset[Node], view: GroupView) -> str | None:
    prologue = ancestors(m, members)
    epilogue = {n for n in members if m in ancestors(n, members)}
    for n in sorted(members - prologue - epilogue - {m}, key=view.position.__getitem__):
        return f"{view.show(n)} neither feeds nor follows {view.show(m)}"
    for operand in m.inputs[1:]:
        if view_root(operand) in members:
            return f"{view.show(view_root(operand))} feeds the weight operand of {view.show(m)}"
    for p in sorted(prologue, key=view.position.__getitem__):
        if role(p) not in _PROLOGUE_ROLES:
            return f"{view.show(p)} cannot run in the prologue of {view.show(m)}"
        if view.traffic.escapes(p, members):
            elsewhere = next((u for u in view.traffic.users[p] if u not in members), None)
            who = view.show(elsewhere) if elsewhere is not None else "a graph output"
            return f"a matmul prologue is recomputed in every output tile: {view.show(p)} is also needed by {who}"
    norms = [p for p in prologue if role(p) == "reduction"]
    if len(norms) > 1:
        return f"a matmul prologue holds one norm ({', '.join(view.show(n) for n in norms)})"
    for norm in norms:
        if view_root(m.inputs[0]) is not norm:
            return f"only views may stand between the prologue norm {view.show(norm)} and {view.show(m)}"
        if norm.type.shape[-1] != m.inputs[0].type.shape[-1]:
            return f"{view.show(norm)} reduces over {norm.type.shape[-1]} channels, not the K of {view.show(m)}"
    for e in sorted(epilogue, key=view.position.__getitem__):
        if role(e) != "pointwise":
            return _EPILOGUE_REASONS[role(e)](view.show(e), view.show(m))
    return None


def _row_kernel_refusal(nodes: list[Node], members: frozenset[Node], view: GroupView) -> str | None:
    gathers = [n for n in nodes if role(n) == "gather"]
    if len(gathers) > 1:
        return f"one kernel holds one gather ({view.show(gathers[0])}, {view.show(gathers[1])})"
    for g in gathers:
        before = ancestors(g, members)
        if before:
            return f"{view.show(g)} would follow {view.show(min(before, key=view.position.__getitem__))} in one kernel"
    reductions = [n for n in nodes if role(n) == "reduction"]
    if len(reductions) > 1:
        a, b = reductions[:2]
        shared = [i for i in a.inputs if i in b.inputs and i.op != "param"]
        if shared:
            return f"value {view.names[shared[0]]} is needed by two reductions ({view.show(a)}, {view.show(b)})"
        return f"one kernel holds one reduction ({view.show(a)}, {view.show(b)})"
    return None
