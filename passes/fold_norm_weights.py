"""Norm-weight folding: `linear(rms_norm(x, w), W)` becomes `linear(rms_norm(x), W')` with
W' = W * w along K (a derived param, `derive=ScaleColumns(W, by=w)`), when every user of the
norm is a linear reading it as x.

The weightless norm then only scales each row by rsqrt(mean(x^2) + eps), which a GEMM can
apply to its output rows: this is what lets the fusion pass put the norm into the matmul's
prologue at no cost. Refused (and noted) when a linear's weight is also read elsewhere (tied
embeddings): folding would store a second, scaled copy of it; and when a linear's weight is
quantized (scaling its columns would change every code). Run after pack_weights (fold
once into the packed weight) and sink_row_gather (the final norm reaches the LM head).
"""

from __future__ import annotations

from kiln.ir import Graph, GraphBuilder, Node
from kiln.passes.context import PassContext
from kiln.passes.dce import eliminate_dead_code
from kiln.passes.derive import ScaleColumns, weight_expr


def _foldable(graph: Graph, users: dict[Node, list[Node]], ctx: PassContext) -> set[Node]:
    norms = set()
    for norm in graph.nodes:
        if norm.op != "rms_norm" or len(norm.inputs) < 2 or norm.inputs[1].op != "param" or norm in graph.outputs.values():
            continue
        readers = users[norm]
        if not readers or any(r.op != "linear" or r.inputs[0] is not norm or norm in r.inputs[1:] for r in readers):
            continue
        quantized = [r.inputs[1] for r in readers if "quant" in r.inputs[1].attrs]
        if quantized:
            ctx.note(f"not folded {norm.inputs[1].name}: {quantized[0].name} is quantized (scaling its columns "
                     "would change every code)")
            continue
        shared = [r.inputs[1] for r in readers if r.inputs[1].op != "param" or len(users[r.inputs[1]]) > 1]
        if shared:
            other = next(u for u in users[shared[0]] if u not in readers)
            ctx.note(f"not folded {norm.inputs[1].name}: {shared[0].name} is also read by {other.op} "
                     "(tied weights); folding would store a second, scaled copy")
            continue
        norms.add(norm)
    return norms


def fold_norm_weights(graph: Graph, ctx: PassContext | None = None) -> Graph:
    ctx = ctx or PassContext()
    users = graph.users()
    norms = _foldable(graph, users, ctx)
    folded_into: dict[Node, Node] = {}  # linear -> the norm weight to fold into its weight

    def rewrite(builder: GraphBuilder, node: Node, inputs: tuple[Node, ...]) -> Node | None:
        if node in norms:
            for reader in users[node]:
                folded_into[reader] = inputs[1]
            ctx.note(f"folded {inputs[1].name} into the weight of the linear that reads the norm")
            return builder.op("rms_norm", inputs[0], **node.attrs)
        if node in folded_into:
            w, by = inputs[1], folded_into[node]
            scaled = builder.param(f"{w.name}*{by.name}", w.type, derive=ScaleColumns(weight_expr(w), weight_expr(by)))
            return builder.op("linear", inputs[0], scaled, *inputs[2:], **node.attrs)
        return None

    return eliminate_dead_code(graph.rebuild(rewrite))  # the norm weights and unscaled weights
