"""Fusion: hand-written graphs and the fused graphs expected of them (bodies included), the
reasons recorded for fusions refused, numbers unchanged by fusion, and the launch count of the
SmolLM2 decoder layer."""

import torch

from kiln.frontend.tracer import trace
from kiln.ir import FusionPattern, GraphBuilder, T, TensorType, TupleType, interpret
from kiln.models import build_spec
from kiln.passes import PassContext, launches, launches_per_layer, run_pipeline
from kiln.passes.fuse import fuse
from kiln.passes.pipeline import PipelineOptions

X = TensorType((T, 8), "f32")
W8 = TensorType((8,), "f32")


def _same_numbers(before, after):
    g = torch.Generator().manual_seed(0)
    inputs = {n.name: torch.randn(n.type.concrete_shape({T: 5}), generator=g) for n in before.inputs}
    weights = {n.name: torch.randn(n.type.concrete_shape({}), generator=g) for n in before.params}
    want, got = interpret(before, inputs, weights, {}), interpret(after, inputs, weights, {})
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_residual_add_and_norm_become_one_kernel_that_writes_both(assert_graph_equal):
    b = GraphBuilder()
    x, r = b.input("x", X), b.input("r", X)
    h = b.op("add", x, r)
    n = b.op("rms_norm", h, b.param("w", W8), eps=1e-6)
    b.output("h", h)
    b.output("y", b.op("silu", n))
    before = b.build()
    got = fuse(before)

    body = GraphBuilder("k0_rms_norm")
    s = body.op("add", body.input("in0", X), body.input("in1", X))
    body.output("out0", s)
    body.output("out1", body.op("silu", body.op("rms_norm", s, body.input("in2", W8), eps=1e-6)))
    w = GraphBuilder()
    x, r, weight = w.input("x", X), w.input("r", X), w.param("w", W8)
    k = w.op("fused", x, r, weight, body=body.build(), pattern=FusionPattern("rms_norm", ("add",), ("silu",)))
    w.output("h", w.op("get", k, index=0))
    w.output("y", w.op("get", k, index=1))
    assert_graph_equal(got, w.build())
    assert k.type == TupleType((X, X))
    _same_numbers(before, got)


def test_a_value_needed_by_two_reductions_is_left_unfused_with_the_reason(assert_graph_equal):
    b = GraphBuilder()
    h = b.op("add", b.input("x", X), b.input("r", X))
    b.output("a", b.op("rms_norm", h, b.param("wa", W8), eps=1e-6))
    b.output("b", b.op("rms_norm", h, b.param("wb", W8), eps=1e-6))
    before, ctx = b.build(), PassContext()
    got = fuse(before, ctx)

    body = GraphBuilder("k0_rms_norm")
    s = body.op("add", body.input("in0", X), body.input("in1", X))
    body.output("out0", s)
    body.output("out1", body.op("rms_norm", s, body.input("in2", W8), eps=1e-6))
    w = GraphBuilder()
    k = w.op("fused", w.input("x", X), w.input("r", X), w.param("wa", W8), body=body.build(),
             pattern=FusionPattern("rms_norm", ("add",), ()))
    h, a = w.op("get", k, index=0), w.op("get", k, index=1)
    w.output("a", a)
    w.output("b", w.op("rms_norm", h, w.param("wb", W8), eps=1e-6))
    assert_graph_equal(got, w.build())
    assert ("kept apart %0 add + %1 rms_norm | %2 rms_norm: "
            "value %0 is needed by two reductions (%1 rms_norm, %2 rms_norm)") in ctx.notes
    _same_numbers(before, got)


def test_matmul_epilogues_absorb_silu_mul_and_the_residual_add_but_never_a_second_matmul(assert_graph_equal):
    b = GraphBuilder()
    x = b.input("x", X)
    gate_up = b.op("linear", x, b.param("gate_up", TensorType((32, 8), "f32")))
    act = b.op("mul", b.op("silu", b.op("slice", gate_up, dim=1, start=0, stop=16)),
               b.op("slice", gate_up, dim=1, start=16, stop=32))
    b.output("y", b.op("add", x, b.op("linear", act, b.param("down", TensorType((8, 16), "f32")))))
    before, ctx = b.build(), PassContext()
    got = fuse(before, ctx)

    up = GraphBuilder("k0_linear")
    h = up.op("linear", up.input("in0", X), up.input("in1", TensorType((32, 8), "f32")))
    up.output("out0", up.op("mul", up.op("silu", up.op("slice", h, dim=1, start=0, stop=16)),
                            up.op("slice", h, dim=1, start=16, stop=32)))
    down = GraphBuilder("k1_linear")
    d = down.op("linear", down.input("in0", TensorType((T, 16), "f32")), down.input("in1", TensorType((8, 16), "f32")))
    down.output("out0", down.op("add", down.input("in2", X), d))
    w = GraphBuilder()
    x = w.input("x", X)
    k0 = w.op("fused", x, w.param("gate_up", TensorType((32, 8), "f32")), body=up.build(),
              pattern=FusionPattern("linear", (), ("silu", "mul")))
    w.output("y", w.op("fused", k0, w.param("down", TensorType((8, 16), "f32")), x, body=down.build(),
                       pattern=FusionPattern("linear", (), ("add",))))
    assert_graph_equal(got, w.build())
    assert any("would recompute matmul %0 linear in every output tile of %5 linear" in n for n in ctx.notes)
    _same_numbers(before, got)


def test_a_norm_read_elsewhere_is_not_a_matmul_prologue():
    b = GraphBuilder()
    n = b.op("rms_norm", b.input("x", X), eps=1e-6)
    b.output("y", b.op("linear", n, b.param("w", TensorType((4, 8), "f32"))))
    b.output("n", n)
    before, ctx = b.build(), PassContext()
    got = fuse(before, ctx)
    assert launches(got) == 2
    assert any("a matmul prologue is recomputed in every output tile: %0 rms_norm is also needed by a graph output" in n
               for n in ctx.notes)
    _same_numbers(before, got)


SMOLLM2 = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192)
LAYER_KERNELS = ["rms_norm > linear", "rope, rope, kv_write, kv_write", "{attention}", "linear > add",
                 "rms_norm > linear > silu, mul", "linear > add"]


def test_the_smollm2_decoder_layer_runs_in_six_launches():
    graph = trace(build_spec(SMOLLM2))  # tracing needs no weights
    lowered, report = run_pipeline(graph, PipelineOptions())
    print(report.summary())
    for phase, attention in (("mixed", "attention_prefill"), ("decode", "attention_decode")):
        fused = lowered[phase]
        assert launches_per_layer(fused) == 6.0 <= 6
        before, after = report.launches_per_layer(phase)
        assert before > 15 and after == 6.0
        assert report.launches(phase) == (454, 182)  # 15 per layer + embedding, final norm, gather, LM head
        kernels = [str(n.attrs["pattern"]) if n.op == "fused" else n.op for n in fused.nodes
                   if n.op not in ("input", "param", "state", "get", "reshape", "slice")]
        expected = [k.format(attention=attention) for k in LAYER_KERNELS]
        assert kernels == ["embedding", *expected * 30, "gather_rows, rms_norm > linear"]
