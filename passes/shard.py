"""Tensor parallelism: `shard(graph, tp)` rewrites a traced step graph into the graph that each of
tp ranks runs (Megatron-style, as vLLM shards): one graph for every rank, with one rank's shapes.

What each rank holds is decided by passes/shard_layout.py: q/k/v (packed or not) and gate/up are
column-parallel, o_proj and down_proj row-parallel, each followed by an `all_reduce`; attention
runs on the rank's heads (KV heads replicated over groups of ranks when tp exceeds them); the
embedding is vocab-parallel (each rank looks up the ids in its slice, zero elsewhere, then an
all_reduce) and so is lm_head (each rank's slice of the logits, then an `all_gather` along the
vocabulary); mixtures of experts cut every expert's intermediate size; a norm over every head
(OLMo2's q/k norms) runs on the rank's heads, its sum of squares summed over the ranks; recurrent
layers (linear attention and their causal convs) run on the rank's value heads and channels;
other norms, routers and everything else run whole on every rank. The graph's decisions print as
the pass's notes.

The graph is the same for every rank: what differs lives in the weights. Each param and state
that a rank does not hold whole carries a `shard` attribute (passes/shard_specs.py: a cut, rank 0
only, or a rank's vocabulary offset, a small i32 param `<embedding weight>.vocab_start`), and
`shard_specs.shard_weights(graph, weights, rank)` cuts rank r's weights from the full ones.

Run it on the traced graph, after quantize_weights has marked the weights kept quantized and before
the pass pipeline (which then lowers the sharded graph: its params are still the checkpoint's, by
name). Quantized weights are cut still quantized (shard_specs.quantized_cut): a param's `quant`
format becomes the rank's (a per-row format's group shrinks to the rank's columns). Refused, with a
KilnError before any work: a degree below 1; a degree that does not divide the heads or value
heads (or neither divides nor is a multiple of the KV heads or key heads), the vocabulary,
the intermediate sizes (the message lists the degrees that fit: the vocabulary is not padded);
then a quantized weight whose column blocks would split its groups.
"""

from __future__ import annotations

import dataclasses
import math

from kiln.errors import KilnError
from kiln.ir import Graph, GraphBuilder, Node, TensorType
from kiln.passes.context import PassContext
from kiln.passes.shard_layout import Layout, ShardAnalysis, Split, analyze, shared_parts
from kiln.passes.shard_specs import CutDim, RankOffset, quantized_cut

_LOWERED = ("kv_write", "attention_prefill", "attention_decode", "fused")  # ops the pipeline introduces


def shard(graph: Graph, tp: int, ctx: PassContext | None = None) -> Graph:
    """The graph one rank of `tp` runs (tp 1: `graph` itself). See the module docstring."""
    ctx = ctx or PassContext()
    _refuse(graph, tp)
    if tp == 1:
        return graph
    analysis = _fitting_analysis(graph, tp)  # a degree that does not fit is refused as such, first
    for note in analysis.notes:
        ctx.note(note)
    return _Rewrite(graph, analysis).run()


def fitting_degrees(graph: Graph) -> list[int]:
    """The tensor-parallel degrees `graph` can be sharded over: divisors of every attention
    layer's heads (and of the vocabulary) that the analysis accepts."""
    sizes = [n.attrs["spec"].num_heads for n in graph.nodes if n.op == "attention"]
    sizes += [n.attrs["spec"].num_v_heads for n in graph.nodes if n.op == "linear_attention"]
    sizes += [int(n.inputs[0].type.shape[0]) for n in graph.nodes if n.op == "embedding"]
    common = math.gcd(*sizes) if sizes else 1
    return [1] + [d for d in range(2, common + 1) if common % d == 0 and _fits(graph, d)]


def _fits(graph: Graph, tp: int) -> bool:
    try:
        _refuse(graph, tp)
        return not analyze(graph, tp).problems
    except KilnError:
        return False


def _refuse(graph: Graph, tp: int) -> None:
    if not isinstance(tp, int) or tp < 1:
        raise KilnError(f"tensor-parallel degree {tp!r}: it must be a whole number of ranks, 1 or more")
    if tp == 1:
        return
    ops = {n.op for n in graph.nodes}
    done = sorted(ops & {*_LOWERED, "all_reduce", "all_gather"})
    if done:
        raise KilnError(f"shard runs once, on a traced graph, but this one holds {', '.join(done)}: shard before the "
                        "pass pipeline (a compiler bug; report it)")


def _fitting_analysis(graph: Graph, tp: int) -> ShardAnalysis:
    analysis = analyze(graph, tp)
    if analysis.problems:
        fitting = ", ".join(map(str, fitting_degrees(graph)))
        raise KilnError(f"tensor-parallel degree {tp} does not fit this model: {'; '.join(analysis.problems)}. "
                        f"Degrees that fit: {fitting}")
    return analysis


def _local(size: int, parts: int) -> int:
    if size % parts:
        raise KilnError(f"kiln cannot shard this model: a dim of {size} would be cut into {parts} blocks. Use "
                        "tensor-parallel degree 1")
    return size // parts


def _local_type(type_: TensorType, layout: Layout | CutDim) -> TensorType:
    """One rank's type of a value (or weight) of `type_` cut as `layout` says."""
    if layout is None:
        return type_
    cut = layout.cut if isinstance(layout, Split) else layout.segments
    shape = list(type_.shape)
    shape[layout.dim] = sum(_local(size, parts) for size, parts in cut)
    return type_.with_shape(shape)


class _Rewrite:
    """Builds one rank's graph: local shapes, local attributes (reshape shapes, slice bounds,
    attention heads), collectives after row-parallel ops and before cut outputs."""

    def __init__(self, graph: Graph, analysis: ShardAnalysis):
        self.graph, self.analysis, self.tp = graph, analysis, analysis.tp
        self.builder = GraphBuilder(graph.name)
        self.layouts = analysis.layouts

    def run(self) -> Graph:
        env: dict[Node, Node] = {}
        rewrites = {"param": self._source, "state": self._source, "reshape": self._reshape, "slice": self._slice,
                    "attention": self._attention, "linear": self._linear, "embedding": self._embedding,
                    "moe": self._moe, "rms_norm": self._rms_norm, "linear_attention": self._linear_attention}
        for node in self.graph.nodes:
            inputs = tuple(env[i] for i in node.inputs)
            rewrite = rewrites.get(node.op)
            env[node] = rewrite(node, inputs) if rewrite else self.builder.copy(node, inputs)
        for name, node in self.graph.outputs.items():
            layout = self.layouts[node]
            out = env[node] if layout is None else self.builder.op("all_gather", env[node], dim=layout.dim, ranks=self.tp)
            self.builder.output(name, out)
        return self.builder.build()

    def _source(self, node: Node, inputs) -> Node:
        cut = self.analysis.cuts.get(node.name)
        extra = {k: v for k, v in node.attrs.items() if k not in ("name", "type")}
        if cut is None:
            return self.builder.source(node.op, node.name, node.type, **extra)
        local = _local_type(node.type, cut if isinstance(cut, CutDim) else None)
        if "quant" in extra and isinstance(cut, CutDim):
            try:
                extra["quant"] = quantized_cut(extra["quant"], tuple(node.type.shape), cut)
            except KilnError as e:
                raise KilnError(f"{node.name}: {e}") from None
        return self.builder.source(node.op, node.name, local, **extra, shard=cut)

    def _reshape(self, node: Node, inputs) -> Node:
        return self.builder.op("reshape", *inputs, shape=_local_type(node.type, self.layouts[node]).shape)

    def _slice(self, node: Node, inputs) -> Node:
        cut = self.layouts[node.inputs[0]]
        if cut is None or cut.dim != node.attrs["dim"] % node.type.rank:
            return self.builder.copy(node, inputs)
        ends, local_ends = [0], [0]
        for segment in cut.segments:
            ends.append(ends[-1] + segment.size)
            local_ends.append(local_ends[-1] + segment.size // segment.parts)
        start, stop = (local_ends[ends.index(node.attrs[k])] for k in ("start", "stop"))
        return self.builder.op("slice", *inputs, **{**node.attrs, "start": start, "stop": stop})

    def _attention(self, node: Node, inputs) -> Node:
        spec = node.attrs["spec"]
        local = dataclasses.replace(spec, num_heads=spec.num_heads // self.tp,
                                    num_kv_heads=spec.num_kv_heads // shared_parts(spec.num_kv_heads, self.tp))
        return self.builder.op("attention", *inputs, **{**node.attrs, "spec": local})

    def _linear_attention(self, node: Node, inputs) -> Node:
        if self.layouts[node] is None:  # run whole on every rank (shard_layout's _linear_attention)
            return self.builder.copy(node, inputs)
        spec = node.attrs["spec"]
        local = dataclasses.replace(spec, num_k_heads=spec.num_k_heads // shared_parts(spec.num_k_heads, self.tp),
                                    num_v_heads=spec.num_v_heads // self.tp)
        return self.builder.op("linear_attention", *inputs, **{**node.attrs, "spec": local})

    def _linear(self, node: Node, inputs) -> Node:
        row_parallel = self.layouts[node.inputs[0]] is not None
        return self._reduced(node, inputs) if row_parallel else self.builder.copy(node, inputs)

    def _moe(self, node: Node, inputs) -> Node:
        experts_cut = node.inputs[3].name in self.analysis.cuts
        return self._reduced(node, inputs) if experts_cut else self.builder.copy(node, inputs)

    def _reduced(self, node: Node, inputs) -> Node:
        """A node whose ranks each compute a part of the sum: the sum over the ranks."""
        return self.builder.op("all_reduce", self.builder.copy(node, inputs), ranks=self.tp)

    def _rms_norm(self, node: Node, inputs) -> Node:
        """An rms_norm over the cut dim (shard_layout's _reduction): each rank's sum of squares,
        summed over the ranks (a block that `tp / parts` ranks share counted once), as the mean
        over the whole dim, in fp32 as the reference computes it."""
        layout = self.layouts[node.inputs[0]]
        if layout is None or layout.dim != node.inputs[0].type.rank - 1:
            return self.builder.copy(node, inputs)
        b = self.builder
        x, *weight = inputs
        ((size, parts),) = layout.cut
        h = x if x.type.dtype == "f32" else b.op("cast", x, dtype="f32")
        squares = b.op("all_reduce", b.op("sum", b.op("mul", h, h), dim=-1, keepdim=True), ranks=self.tp)
        mean = b.op("mul", squares, b.op("const", value=parts / (self.tp * size), dtype="f32"))
        y = b.op("mul", h, b.op("rsqrt", b.op("add", mean, b.op("const", value=node.attrs["eps"], dtype="f32"))))
        y = y if x.type.dtype == "f32" else b.op("cast", y, dtype=x.type.dtype)
        return b.op("mul", weight[0], y) if weight else y

    def _embedding(self, node: Node, inputs) -> Node:
        """The rank's rows of the vocabulary: ids outside them look up a clamped row, zeroed."""
        b = self.builder
        weight, ids = inputs
        if node.inputs[0].name not in self.analysis.cuts:  # a computed table: whole on every rank
            return b.copy(node, inputs)
        block = int(weight.type.shape[0])
        start = b.param(f"{node.inputs[0].name}.vocab_start", TensorType((), "i32"), shard=RankOffset(block))
        local = b.op("sub", ids, start)
        clamped = b.op("clamp", local, min=0, max=block - 1)
        inside = b.op("reshape", b.op("eq", local, clamped), shape=(*ids.type.shape, 1))
        rows = b.op("where", inside, b.op("embedding", weight, clamped), b.op("const", value=0.0, dtype=weight.type.dtype))
        return b.op("all_reduce", rows, ranks=self.tp)
