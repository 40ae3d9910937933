"""Passes that change weights (as derived params, never tensors): packing, norm folding, and the
row-gather sinking that lets the final norm reach the LM head; and materialize_weights."""

import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.frontend.blocks import Attention, Embedding, LastTokens, Linear, RMSNorm, Rope
from kiln.frontend.tracer import trace
from kiln.ir import AttentionKind, AttentionSpec, B, GraphBuilder, RopeSpec, T, TensorType, interpret
from kiln.passes import ConcatWeights, PassContext, ScaleColumns, launches_per_layer, materialize_weights, run_pipeline
from kiln.passes.fold_norm_weights import fold_norm_weights
from kiln.passes.pack_weights import pack_weights
from kiln.passes.pipeline import PipelineOptions
from kiln.passes.sink_row_gather import sink_row_gather


def f32(*shape):
    return TensorType(shape, "f32")


def _qkv_graph(bias_on_v: bool = False):
    b = GraphBuilder()
    x = b.input("x", f32(T, 8))
    q = b.op("linear", x, b.param("a.q_proj.weight", f32(8, 8)))
    k = b.op("linear", x, b.param("a.k_proj.weight", f32(4, 8)))
    v_extra = [b.param("a.v_proj.bias", f32(4))] if bias_on_v else []
    v = b.op("linear", x, b.param("a.v_proj.weight", f32(4, 8)), *v_extra)
    b.output("q", q)
    b.output("kv", b.op("mul", k, v))
    return b.build()


def test_linears_reading_one_input_pack_into_one(assert_graph_equal):
    before = _qkv_graph()
    got = pack_weights(before)

    w = GraphBuilder()
    x = w.input("x", f32(T, 8))
    derive = ConcatWeights(("a.q_proj.weight", "a.k_proj.weight", "a.v_proj.weight"), dim=0)
    qkv = w.op("linear", x, w.param("a.q_proj+k_proj+v_proj.weight", f32(16, 8), derive=derive))
    q, k, v = (w.op("slice", qkv, dim=1, start=s, stop=e) for s, e in ((0, 8), (8, 12), (12, 16)))
    w.output("q", q)
    w.output("kv", w.op("mul", k, v))
    assert_graph_equal(got, w.build())

    weights = {n: torch.randn(p.type.concrete_shape({})) for n, p in ((p.name, p) for p in before.params)}
    x = {"x": torch.randn(5, 8)}
    want, have = interpret(before, x, weights, {}), interpret(got, x, materialize_weights(got, weights), {})
    for name in want:
        torch.testing.assert_close(have[name], want[name])


def test_packing_is_refused_when_only_some_linears_have_a_bias(assert_graph_equal):
    before, ctx = _qkv_graph(bias_on_v=True), PassContext()
    assert_graph_equal(pack_weights(before, ctx), before)
    assert any("some have a bias and some do not" in n for n in ctx.notes)


def _norm_then_linear(tied: bool):
    b = GraphBuilder()
    x, ids = b.input("x", f32(T, 8)), b.input("ids", TensorType((T,), "i32"))
    weight = b.param("head.weight", f32(16, 8))
    n = b.op("rms_norm", x, b.param("norm.weight", f32(8)), eps=1e-5)
    b.output("y", b.op("linear", n, weight))
    if tied:
        b.output("e", b.op("embedding", weight, ids))
    return b.build()


def test_a_norm_weight_folds_into_the_linear_that_reads_the_norm(assert_graph_equal):
    before = _norm_then_linear(tied=False)
    got = fold_norm_weights(before)

    w = GraphBuilder()
    x = w.input("x", f32(T, 8))
    w.input("ids", TensorType((T,), "i32"))
    n = w.op("rms_norm", x, eps=1e-5)
    scaled = w.param("head.weight*norm.weight", f32(16, 8), derive=ScaleColumns("head.weight", "norm.weight"))
    w.output("y", w.op("linear", n, scaled))
    assert_graph_equal(got, w.build())

    weights = {"head.weight": torch.randn(16, 8), "norm.weight": 1 + torch.rand(8)}
    x = {"x": torch.randn(4, 8), "ids": torch.zeros(4, dtype=torch.int32)}
    torch.testing.assert_close(interpret(got, x, materialize_weights(got, weights), {})["y"],
                               interpret(before, x, weights, {})["y"])


def test_folding_into_a_tied_weight_is_refused_with_the_reason(assert_graph_equal):
    before, ctx = _norm_then_linear(tied=True), PassContext()
    assert_graph_equal(fold_norm_weights(before, ctx), before)
    assert any("head.weight is also read by embedding (tied weights)" in n for n in ctx.notes)


def test_a_row_gather_moves_above_the_row_wise_ops_that_feed_only_it(assert_graph_equal):
    b = GraphBuilder()
    x, idx = b.input("x", f32(T, 8)), b.input("idx", TensorType((B,), "i32"))
    w = b.param("w", f32(8))
    h = b.op("mul", b.op("rms_norm", x, w, eps=1e-6), b.op("const", value=2.0, dtype="f32"))
    b.output("y", b.op("gather_rows", h, idx))
    before = b.build()
    got = sink_row_gather(before)

    e = GraphBuilder()
    x, idx = e.input("x", f32(T, 8)), e.input("idx", TensorType((B,), "i32"))
    two = e.op("const", value=2.0, dtype="f32")
    n = e.op("rms_norm", e.op("gather_rows", x, idx), e.param("w", f32(8)), eps=1e-6)
    e.output("y", e.op("mul", n, two))
    assert_graph_equal(got, e.build())
    inputs = {"x": torch.randn(6, 8), "idx": torch.tensor([5, 1], dtype=torch.int32)}
    weights = {"w": torch.rand(8)}
    torch.testing.assert_close(interpret(got, inputs, weights, {})["y"], interpret(before, inputs, weights, {})["y"])


def test_a_gather_stays_below_an_op_whose_value_is_also_read_elsewhere(assert_graph_equal):
    b = GraphBuilder()
    x, idx = b.input("x", f32(T, 8)), b.input("idx", TensorType((B,), "i32"))
    h = b.op("silu", x)
    b.output("y", b.op("gather_rows", h, idx))
    b.output("h", h)
    before = b.build()
    assert_graph_equal(sink_row_gather(before), before)


def test_materialize_weights_evaluates_nested_derivations():
    b = GraphBuilder()
    expr = ScaleColumns(ConcatWeights(("g.weight", "u.weight"), dim=0), by="n.weight")
    p = b.param("gu*n", f32(6, 4), derive=expr)
    b.output("y", b.op("linear", b.input("x", f32(T, 4)), p))
    graph = b.build()
    weights = {"g.weight": torch.randn(2, 4), "u.weight": torch.randn(4, 4), "n.weight": torch.randn(4)}
    got = materialize_weights(graph, weights)
    assert set(got) == {"gu*n"}
    torch.testing.assert_close(got["gu*n"], torch.cat([weights["g.weight"], weights["u.weight"]]) * weights["n.weight"])
    with pytest.raises(KilnError, match="the weights have no tensor 'u.weight'"):
        materialize_weights(graph, {"g.weight": weights["g.weight"], "n.weight": weights["n.weight"]})
    with pytest.raises(KilnError, match="computes to .* but the graph needs f32\\[6, 4\\]"):
        materialize_weights(graph, {**weights, "u.weight": torch.randn(3, 4)})


class NaiveLayer(nn.Module):
    """A decoder layer written without packing: separate q/k/v and gate/up projections."""

    def __init__(self, d=32, heads=4, kv_heads=2, ffn=48):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.norm1, self.norm2 = RMSNorm(d, 1e-5), RMSNorm(d, 1e-5)
        self.q_proj, self.k_proj = Linear(d, d), Linear(d, kv_heads * self.hd)
        self.v_proj, self.o_proj = Linear(d, kv_heads * self.hd), Linear(d, d)
        self.gate_proj, self.up_proj, self.down_proj = Linear(d, ffn), Linear(d, ffn), Linear(ffn, d)
        self.rope = Rope(RopeSpec(self.hd, 10000.0))
        self.attn = Attention(AttentionSpec(AttentionKind.DENSE, heads, kv_heads, self.hd))

    def forward(self, positions, h):
        x = self.norm1(h)
        q = self.rope(self.q_proj(x).view(-1, self.heads, self.hd), positions)
        k = self.rope(self.k_proj(x).view(-1, self.kv_heads, self.hd), positions)
        v = self.v_proj(x).view(-1, self.kv_heads, self.hd)
        h = h + self.o_proj(self.attn(q, k, v).flatten(1))
        x = self.norm2(h)
        return h + self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class NaiveModel(nn.Module):
    def __init__(self, vocab=64, d=32, layers=2):
        super().__init__()
        self.embed = Embedding(vocab, d)
        self.layers = nn.ModuleList(NaiveLayer(d) for _ in range(layers))
        self.norm, self.last, self.head = RMSNorm(d, 1e-5), LastTokens(), Linear(d, vocab)

    def forward(self, input_ids, positions):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(positions, h)
        return self.head(self.last(self.norm(h)))


def test_a_naively_written_spec_is_packed_and_reaches_the_packed_specs_launch_count(helpers):
    spec = NaiveModel()
    graph = trace(spec)
    lowered, report = run_pipeline(graph, PipelineOptions(verify=True))
    pack_notes = report.record("shared", "pack_weights").notes
    assert pack_notes == [f"packed {n} linears into layers.{i}.{name}" for i in range(2)
                          for n, name in ((3, "q_proj+k_proj+v_proj.weight"), (2, "gate_proj+up_proj.weight"))]
    assert [launches_per_layer(g) for g in lowered.values()] == [6.0, 6.0]
    weights = helpers.random_weights(spec)
    scenario = helpers.Scenario(vocab=64)
    want = scenario.run([graph] * 3, [weights] * 3)
    mixed, decode = lowered["mixed"], lowered["decode"]
    mixed_w, decode_w = materialize_weights(mixed, weights), materialize_weights(decode, weights)
    got = scenario.run([mixed, decode, mixed], [mixed_w, decode_w, mixed_w])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
