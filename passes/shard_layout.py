"""The sharding pass's analysis (passes/shard.py rewrites by it): for a tensor-parallel degree
tp, which value each rank holds whole and which it holds a cut of, found by propagating layouts
through the traced graph in order.

A value's layout is None (every rank holds it whole) or a `Split`: cut along one dim, made of
segments laid end to end, each cut into `parts` blocks (parts divides tp; rank r holds block
r * parts // tp of every segment, so parts < tp means groups of ranks share a block). Splits
start at column-parallel linears: a linear over a whole input whose weight is a param is tried
cut along its output features, one segment per part its readers slice out (q | k | v, gate | up;
through a causal conv, whose output is sliced into a linear attention's q | k | v).
Each op's rule gives its output's layout from its inputs':
  - elementwise ops, rope, norms and reductions over another dim, slices along segment bounds
    and reshapes that keep the cut dim outermost keep a split, and so does an rms_norm over a
    cut of one segment (its sum of squares is summed over the ranks); a whole operand of an
    elementwise op computed from params alone (a per-head A_log) has those params cut alike;
  - a linear over an input cut along its features is row-parallel (its weight cut along its
    input features, a bias on rank 0 only); the sum over the ranks makes its output whole;
  - attention takes q cut into tp blocks of heads and k, v into min(tp, KV heads) blocks (ranks
    share a KV head when tp exceeds the KV heads, as vLLM does); its KV cache and sinks are cut
    alike; its output is cut by heads; linear attention likewise by value heads (q, k by key
    heads), its state alike, and a causal conv by channels, its weight and conv state alike;
  - an embedding is vocab-parallel and a mixture of experts cuts every expert's intermediate
    size (gate/up rows, down columns); both give whole outputs (after a sum over the ranks);
  - a graph output cut into tp blocks of one segment is gathered;
  - any other op needs whole inputs.
When a rule cannot take a split input, it asks (`refine`) to cut the linears it came from into
fewer parts (1: computed whole on every rank, a replicated linear: a router, a gate of one
output), goes on as if they were, and the analysis runs again, until every rule takes its
inputs (a round refines every layer at once: a few rounds). A split that no linear
can undo (attention's output where something needs it whole) makes the model unshardable: a
KilnError. What tp does not divide (heads, weight segments) is collected as `problems`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sympy

from kiln.errors import KilnError
from kiln.ir import AttentionSpec, Graph, LinearAttentionSpec, Node, OpKind
from kiln.ir.printer import format_node, node_names
from kiln.passes.shard_specs import CutDim, FirstRank, WeightShard

Origin = tuple[Node, int]  # a column-parallel linear and one segment of its output features


@dataclass(frozen=True)
class Segment:
    size: int
    parts: int
    origins: frozenset[Origin] = frozenset()  # the linear segments it is computed from


@dataclass(frozen=True)
class Split:
    dim: int
    segments: tuple[Segment, ...]

    @property
    def cut(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.size, s.parts) for s in self.segments)

    def moved(self, dim: int) -> Split:
        return Split(dim, self.segments)


Layout = Split | None


def split(dim: int, segments: Iterable[Segment]) -> Layout:
    """A Split, or None when no segment is cut (parts 1 everywhere: whole on every rank)."""
    segments = tuple(segments)
    return Split(dim, segments) if any(s.parts > 1 for s in segments) else None


def shared_parts(shared: int, tp: int) -> int:
    """How many blocks heads that other heads share (attention's KV heads, linear attention's key
    heads) are cut into: tp, or the shared heads themselves when tp exceeds them (each then serves
    tp / shared ranks)."""
    return tp if shared >= tp else shared


@dataclass(frozen=True)
class Refinement:
    """What a rule asked: cut the linear segments `origins` into at most `parts` blocks (1:
    whole), because `node` needs it (`why`). No origins: nothing can give the node what it needs."""

    node: Node
    origins: frozenset[Origin]
    parts: int
    why: str


@dataclass
class ShardAnalysis:
    """Every node's layout, how each param and state is cut (by name), the decisions that
    refined the first guess (notes), and what tp does not divide (problems; empty if it fits)."""

    tp: int
    layouts: dict[Node, Layout]
    cuts: dict[str, WeightShard]
    notes: list[str]
    problems: list[str]


def analyze(graph: Graph, tp: int) -> ShardAnalysis:
    """The layouts of `graph` (a traced graph, its refusals checked by passes/shard.py) at degree tp."""
    parts: dict[Origin, int] = {}
    notes: list[str] = []
    names = node_names(graph)
    while True:
        run = _Propagation(graph, tp, parts)
        run.propagate()
        if not run.refinements:
            return ShardAnalysis(tp, run.layouts, run.cuts, notes, sorted(set(run.problems)))
        lowered = dict(parts)
        for r in run.refinements:
            changed = sorted((o for o in r.origins if parts.get(o, tp) > r.parts), key=lambda o: (names[o[0]], o[1]))
            if not changed and run.problems:  # what tp does not divide explains it: refused with those
                return ShardAnalysis(tp, run.layouts, run.cuts, notes, sorted(set(run.problems)))
            if not changed:
                earlier = "".join(f"; {n}" for n in notes[:3]) + (f"; and {len(notes) - 3} more" if len(notes) > 3 else "")
                raise KilnError(f"kiln cannot shard this model over {tp} ranks: `{format_node(r.node, names)}`: "
                                f"{r.why}{earlier}. Use tensor-parallel degree 1")
            for linear, segment in changed:
                lowered[(linear, segment)] = min(lowered.get((linear, segment), tp), r.parts)
                what = "whole on every rank" if r.parts == 1 else f"cut into {r.parts} blocks"
                notes.append(f"{linear.inputs[1].name} output segment {segment}: {what} "
                             f"({names[r.node]} {r.node.op}: {r.why})")
        parts = lowered


class _Propagation:
    """One pass over the graph with the linear segments cut as `parts` says (tp by default)."""

    def __init__(self, graph: Graph, tp: int, parts: dict[Origin, int]):
        self.graph, self.tp, self.parts = graph, tp, parts
        self.users = graph.users()
        self.layouts: dict[Node, Layout] = {}
        self.cuts: dict[str, WeightShard] = {}
        self.problems: list[str] = []
        self.refinements: list[Refinement] = []
        self.node: Node  # the node whose rule runs

    def propagate(self) -> None:
        for node in self.graph.nodes:
            self.node = node
            self.layouts[node] = _rule(node)(self, node, [self.layouts[i] for i in node.inputs])
        for node in self.graph.outputs.values():
            self.node, layout = node, self.layouts[node]
            if layout is not None and (len(layout.segments) > 1 or layout.segments[0].parts < self.tp):
                self.refine([layout], 1, "an output is gathered from tp blocks of one segment")

    def refine(self, splits: Iterable[Split], parts: int, why: str) -> Layout:
        """Asks for the linear segments `splits` come from to be cut into at most `parts` blocks
        (see Refinement); the caller goes on as if they were. Returns None: the layout of an
        output computed from whole inputs, for rules that refine to 1."""
        origins = frozenset().union(*(s.origins for x in splits for s in x.segments))
        self.refinements.append(Refinement(self.node, origins, parts, why))
        return None

    def cut(self, source: Node, shard: WeightShard) -> None:
        """Records how a param or state is cut (and what tp does not divide of it)."""
        if self.cuts.setdefault(source.name, shard) != shard:
            raise KilnError(f"kiln cannot shard weight {source.name!r} over {self.tp} ranks: it is read cut two ways "
                            f"({self.cuts[source.name]} and {shard}). Use tensor-parallel degree 1")
        if isinstance(shard, CutDim) and source.op == "param":
            odd = [size for size, parts in shard.segments if size % parts]
            if odd:
                where = re.sub(r"\.\d+\.", ".*.", source.name)
                what = {0: "rows", 1: "columns"}.get(shard.dim, f"dim {shard.dim}")
                self.problems.append(f"it does not divide the {what} ({' + '.join(map(str, odd))}) of {where}")

    def column(self, linear: Node) -> Layout:
        """The output layout of a column-parallel `linear`: its output features cut into segments
        where its readers slice them (through a per-channel causal conv: q | k | v of a linear
        attention layer's projection are sliced after its conv)."""
        ends = sorted({0, int(linear.type.shape[-1])} | self._feature_bounds(linear, 0))
        return split(linear.type.rank - 1, (Segment(b - a, self.parts.get((linear, i), self.tp), frozenset({(linear, i)}))
                                            for i, (a, b) in enumerate(zip(ends, ends[1:]))))

    def _feature_bounds(self, node: Node, offset: int) -> set[int]:
        """Where `node`'s readers slice its last dim (plus `offset`), looking through those slices
        and through causal convs (which keep every channel where it is)."""
        bounds: set[int] = set()
        for user in self.users[node]:
            if user.op == "slice" and user.attrs["dim"] % user.type.rank == user.type.rank - 1:
                start = offset + user.attrs["start"]
                bounds |= {start, offset + user.attrs["stop"]} | self._feature_bounds(user, start)
            elif user.op == "causal_conv1d" and user.inputs[0] is node:
                bounds |= self._feature_bounds(user, offset)
        return bounds

    def cut_alike(self, node: Node, dim: int, layout: Split) -> bool:
        """Cuts the params that `node` is computed from (by elementwise ops and reshapes that add
        or drop unit dims, with no other reader) so that each rank computes its block of `node`
        along `dim` as `layout` cuts it: a per-head weight (Qwen3-Next's A_log, Mamba2's D)
        meeting a value cut by heads. False (nothing cut) when `node` is not such a value."""
        chain = _weight_chain(node, dim, self.users, self.layouts)
        if chain is None:
            return False
        for value, at in chain:
            self.layouts[value] = layout.moved(at)
            if value.op == "param":
                self.cut(value, CutDim(at, layout.cut, self.tp))
        return True


Rule = Callable[[_Propagation, Node, list[Layout]], Layout]


def _whole(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    cut = [x for x in ins if x is not None]
    if cut:
        run.refine(cut, 1, f"{node.op} needs its inputs whole")
    return None


def _elementwise(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    """Inputs cut alike (broadcast to the output's rank); whole inputs only of size 1 along the cut."""
    cut = {i: x for i, x in enumerate(ins) if x is not None}
    if not cut:
        return None
    rank = node.type.rank
    dims = {x.dim + rank - node.inputs[i].type.rank for i, x in cut.items()}
    if len(dims) > 1 or len({x.cut for x in cut.values()}) > 1:
        return run.refine(cut.values(), 1, "its inputs are cut differently")
    dim = dims.pop()
    columns = zip(*(x.segments for x in cut.values()))
    out = Split(dim, tuple(Segment(c[0].size, c[0].parts, frozenset().union(*(s.origins for s in c))) for c in columns))
    for i, x in enumerate(node.inputs):
        at = dim - (rank - x.type.rank)
        if i not in cut and at >= 0 and x.type.shape[at] != 1 and not run.cut_alike(x, at, out):
            return run.refine(cut.values(), 1, "it combines a cut input with a whole one")
    return out


def _weight_chain(node: Node, dim: int, users: dict, layouts: dict) -> list[tuple[Node, int]] | None:
    """`node` and the values it is computed from, each with the dim that `dim` of `node` is, when
    `node` is computed from params (by elementwise ops, and reshapes that add or drop unit dims)
    and read by one op only, each of those values too; else None. Whole values broadcast along
    `dim` may join in."""
    if len(users[node]) != 1 or layouts.get(node) is not None:
        return None
    if node.op == "param":
        return [(node, dim)]
    if node.op == "reshape":
        source = node.inputs[0].type.shape
        if [s for s in source if s != 1] != [s for s in node.type.shape if s != 1]:
            return None
        at = _reshaped_dim(node.type.shape, source, dim)
        rest = None if at is None else _weight_chain(node.inputs[0], at, users, layouts)
        return None if rest is None else [(node, dim), *rest]
    if node.kind != OpKind.ELEMENTWISE:
        return None
    chain = [(node, dim)]
    for x in node.inputs:
        at = dim - (node.type.rank - x.type.rank)
        if at < 0 or x.type.shape[at] == 1:
            if layouts.get(x) is not None:
                return None
            continue
        rest = _weight_chain(x, at, users, layouts)
        if rest is None:
            return None
        chain += rest
    return chain


def _reduction(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    """Over `dim` (norms: the last dim), which must not be the cut one, except for an rms_norm
    over one segment (OLMo2's q/k norms span every head): its output is cut as its input, its
    weight alike, and passes/shard.py sums the squares over the ranks. Other norm weights whole."""
    x, *rest = ins
    _whole(run, node, rest)
    if x is None:
        return None
    rank = node.inputs[0].type.rank
    dim = node.attrs.get("dim", -1) % rank
    if x.dim == dim:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if node.op == "rms_norm" and len(x.segments) == 1 and (weight is None or weight.op == "param"):
            if weight is not None:
                run.cut(weight, CutDim(0, x.cut, run.tp))
            return x
        return run.refine([x], 1, f"{node.op} reduces over the cut dim")
    return x.moved(x.dim - 1) if node.type.rank < rank and x.dim > dim else x


def _linear(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    """Column-parallel over a whole input, row-parallel over an input cut along its features."""
    x, *weight_layouts = ins
    weight, *bias = node.inputs[1:]
    if any(weight_layouts) or any(w.op != "param" for w in node.inputs[1:]):
        return _whole(run, node, ins)
    if x is None:
        out = run.column(node)
        if out is not None:
            for param in (weight, *bias):
                run.cut(param, CutDim(0, out.cut, run.tp))
        return out
    if x.dim != node.inputs[0].type.rank - 1 or any(s.parts != run.tp for s in x.segments):
        return run.refine([x], 1, "a row-parallel linear needs its input features cut into tp blocks")
    run.cut(weight, CutDim(1, x.cut, run.tp))
    for param in bias:
        run.cut(param, FirstRank())
    return None


def _embedding(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    """Vocab-parallel: each rank looks up the ids of its slice of the vocabulary."""
    weight = node.inputs[0]
    _whole(run, node, ins)
    if weight.op == "param":
        run.cut(weight, CutDim(0, ((int(weight.type.shape[0]), run.tp),), run.tp))
    return None


def _rows(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    """gather_rows and rope: per token, so a cut along a later dim (rope: the heads) stays."""
    x, *rest = ins
    _whole(run, node, rest)
    if x is not None and (x.dim == 0 or (node.op == "rope" and x.dim != 1)):
        return run.refine([x], 1, f"{node.op} needs its input cut along the heads")
    return x


def _reshape(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    (x,) = ins
    if x is None:
        return None
    dim = _reshaped_dim(node.inputs[0].type.shape, node.type.shape, x.dim)
    if dim is None or len(x.segments) > 1:
        return run.refine([x], 1, "the reshape does not keep the cut dim outermost")
    (segment,) = x.segments
    size = int(node.type.shape[dim])
    parts = math.gcd(size, segment.parts)
    if parts < segment.parts:  # fewer rows (Mamba2's groups, KV heads) than blocks: one would split a row
        run.refine([x], parts, f"it makes the cut dim {size} rows (heads, groups): fewer than {segment.parts} blocks")
    return split(dim, (Segment(size, parts, segment.origins),))


def _reshaped_dim(src: tuple, dst: tuple, dim: int) -> int | None:
    """The dim of `dst` that a cut of `src`'s dim `dim` becomes: the first non-unit dim with the
    same product of outer dims (cut into several dims, the cut goes to the outermost; merged with
    inner dims, to the merged one). None when no dim of `dst` starts there."""
    outer = sympy.Mul(*src[:dim])
    for j, size in enumerate(dst):
        if size != 1 and sympy.Mul(*dst[:j]) == outer:
            return j
    return None


def _slice(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    """Along the cut dim: whole segments only."""
    (x,) = ins
    if x is None or x.dim != node.attrs["dim"] % node.type.rank:
        return x
    ends = [0]
    for s in x.segments:
        ends.append(ends[-1] + s.size)
    start, stop = node.attrs["start"], node.attrs["stop"]
    if start not in ends or stop not in ends:
        return run.refine([x], 1, "the slice cuts through a segment")
    return split(x.dim, x.segments[ends.index(start):ends.index(stop)])


def _head_blocks(run: _Propagation, heads: int, what: str, shared: int, shared_what: str) -> int:
    """The blocks a layer's shared heads (KV heads, key heads) are cut into: tp, or the shared
    heads themselves when tp exceeds them (shared_parts); what tp does not divide of its heads and of
    those goes to the problems."""
    tp = run.tp
    if heads % tp:
        run.problems.append(f"it does not divide the {heads} {what}")
    if (shared >= tp and shared % tp) or (shared < tp and tp % shared):
        run.problems.append(f"it neither divides the {shared} {shared_what} nor is a multiple of them")
    return shared_parts(shared, tp)


def _attention(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    """q cut by heads into tp blocks, k and v into shared_parts; the KV cache (dim 2) and sinks alike."""
    q, k, v, *rest = ins
    _whole(run, node, rest)
    spec: AttentionSpec = node.attrs["spec"]
    heads, kv, tp = spec.num_heads, spec.num_kv_heads, run.tp
    parts = _head_blocks(run, heads, "attention heads", kv, "KV heads")
    for name, x, size, want in (("q", q, heads, tp), ("k", k, kv, parts), ("v", v, kv, parts)):
        by_heads = x.cut if x is not None and x.dim == 1 else None
        if (x is None) if want == 1 else by_heads == ((size, want),):
            continue
        blocks = f"cut by heads into {want} blocks" if want > 1 else "whole (its KV heads serve every rank)"
        run.refine([x] if x is not None else [], want if by_heads else 1,
                   f"attention has {heads} heads, {kv} KV heads: it needs its {name} {blocks}")
    for cache in node.inputs[3:5]:
        run.cut(cache, CutDim(2, ((kv, parts),), tp))
    if spec.sinks:
        run.cut(node.inputs[9], CutDim(0, ((heads, tp),), tp))
    return Split(1, (Segment(heads, tp),))


def _linear_attention(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    """A recurrent layer on the rank's heads: v, g, beta and the state cut into tp blocks of value
    heads, q and k into min(tp, key heads) blocks (a key head then serves tp / key heads ranks, as
    attention's KV heads; a key head's value heads are consecutive, so a rank's value heads read
    its key heads). Inputs not cut so (a whole g) run the layer whole on every rank."""
    spec: LinearAttentionSpec = node.attrs["spec"]
    hk, hv, tp = spec.num_k_heads, spec.num_v_heads, run.tp
    k_parts = _head_blocks(run, hv, "value heads of a linear attention layer", hk, "key heads of a linear attention layer")
    wanted = [(ins[0], hk, k_parts, "q"), (ins[1], hk, k_parts, "k"), (ins[2], hv, tp, "v"), (ins[3], hv, tp, "g"),
              *((b, hv, tp, "beta") for b in ins[8:])]
    for x, size, parts, name in wanted:
        got = 1 if x is None else x.cut[0][1] if x.dim == 1 and x.cut[0][0] == size and len(x.cut) == 1 else None
        if got is None and parts > 1 or got is not None and got < parts:
            return _whole(run, node, ins)
        if x is not None and got != parts:
            what = f"cut by heads into {parts} blocks" if parts > 1 else "whole"
            run.refine([x], parts, f"{hk} key heads, {hv} value heads: it needs its {name} {what}")
    _whole(run, node, ins[5:8])
    run.cut(node.inputs[4], CutDim(1, ((hv, tp),), tp))
    origins = frozenset().union(*(s.origins for x in ins if x is not None for s in x.segments))
    return Split(1, (Segment(hv, tp, origins),))  # a reader that needs it whole makes the layer whole


def _causal_conv1d(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    """Per channel: x cut along its channels (any segments), its weight, conv state and bias alike."""
    x, *rest = ins
    _whole(run, node, rest)
    if x is None:
        return None
    if x.dim != 1 or not all(run.cut_alike(w, 0, x) for w in (node.inputs[1], *node.inputs[6:])):
        return run.refine([x], 1, "a causal conv needs its channels cut and its weights read from params")
    run.cut(node.inputs[2], CutDim(2, x.cut, run.tp))
    return x


def _moe(run: _Propagation, node: Node, ins: list[Layout]) -> Layout:
    """Every expert's intermediate size cut: gate/up rows (two segments), down columns; the down
    bias, added once, on rank 0."""
    _whole(run, node, ins)
    gate_up, down, *biases = node.inputs[3:]
    if any(w.op != "param" for w in node.inputs[3:]):
        return None
    intermediate = int(down.type.shape[2])
    halves = CutDim(1, ((intermediate, run.tp),) * 2, run.tp)
    run.cut(gate_up, halves)
    run.cut(down, CutDim(2, ((intermediate, run.tp),), run.tp))
    if biases:
        run.cut(biases[0], halves)
        run.cut(biases[1], FirstRank())
    return None


_RULES: dict[str, Rule] = {
    "linear": _linear, "embedding": _embedding, "gather_rows": _rows, "rope": _rows, "reshape": _reshape,
    "slice": _slice, "attention": _attention, "moe": _moe, "linear_attention": _linear_attention,
    "causal_conv1d": _causal_conv1d,
}
_KIND_RULES: dict[OpKind, Rule] = {
    OpKind.SOURCE: _whole, OpKind.ELEMENTWISE: _elementwise, OpKind.REDUCTION: _reduction,
}


def _rule(node: Node) -> Rule:
    return _RULES.get(node.op) or _KIND_RULES.get(node.kind, _whole)
