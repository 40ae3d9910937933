"""The IR forms the passes produce: fused nodes with a body, multi-output nodes read with `get`,
KV writes, derived weights and memory-plan buffers; how they print, verify and interpret."""

import pytest
import torch

from kiln.ir import NB, FusionPattern, Graph, GraphBuilder, T, TensorType, TupleType, interpret, print_graph, verify
from kiln.ir.verify import VerifyError
from kiln.passes import ConcatWeights

X = TensorType((T, 8), "f32")


def _body() -> Graph:
    b = GraphBuilder("k0_rms_norm")
    s = b.op("add", b.input("in0", X), b.input("in1", X))
    b.output("out0", s)
    b.output("out1", b.op("rms_norm", s, eps=1e-6))
    return b.build()


def _fused_graph(body: Graph) -> Graph:
    b = GraphBuilder()
    x = b.input("x", X)
    w = b.param("w", TensorType((8, 8), "f32"), derive=ConcatWeights(("a", "b"), dim=0))
    k = b.op("fused", x, b.op("linear", x, w), body=body, pattern=FusionPattern("rms_norm", ("add",), ()), buffer=(0, 1))
    b.output("h", b.op("get", k, index=0))
    b.output("n", b.op("get", k, index=1))
    graph = b.build()
    graph.buffers = (TensorType((8 * T,), "f32"), TensorType((8 * T,), "f32"))
    return graph


def test_a_fused_graph_prints_its_body_its_derived_weights_and_its_buffers():
    assert print_graph(_fused_graph(_body())) == (
        "graph step(T)\n"
        "  %x = input : f32[T, 8]\n"
        "  @w = param(derive=concat(@a, @b; dim=0)) : f32[8, 8]\n"
        "  %0 = linear(%x, @w) : f32[T, 8]\n"
        "  %1 = fused(%x, %0, body=k0_rms_norm, buffer=(0, 1), pattern=add > rms_norm) : (f32[T, 8], f32[T, 8])\n"
        "    graph k0_rms_norm(T)\n"
        "      %in0 = input : f32[T, 8]\n"
        "      %in1 = input : f32[T, 8]\n"
        "      %0 = add(%in0, %in1) : f32[T, 8]\n"
        "      %1 = rms_norm(%0, eps=1e-06) : f32[T, 8]\n"
        "      return out0=%0, out1=%1\n"
        "  %2 = get(%1, index=0) : f32[T, 8]\n"
        "  %3 = get(%1, index=1) : f32[T, 8]\n"
        "  return h=%2, n=%3\n"
        "  buffer b0 : f32[8*T]\n"
        "  buffer b1 : f32[8*T]\n"
    )
    verify(_fused_graph(_body()))


def test_the_verifier_rejects_bodies_and_buffers_that_do_not_fit():
    b = GraphBuilder("k0")
    b.output("out0", b.op("neg", b.input("in0", TensorType((T, 4), "f32"))))
    with pytest.raises(Exception, match=r"inputs \(f32\[T, 8\], f32\[T, 8\]\) do not match body k0 \(f32\[T, 4\]\)"):
        _fused_graph(b.build())
    bad_body = _body()
    bad_body.nodes[2].type = TensorType((T, 9), "f32")
    with pytest.raises(VerifyError, match=r"fused.*bad body: .*recorded type f32\[T, 9\]"):
        verify(_fused_graph(bad_body))
    graph = _fused_graph(_body())
    graph.buffers = graph.buffers[:1]
    with pytest.raises(VerifyError, match="buffer 1 is not a f32 buffer of the plan"):
        verify(graph)
    g = GraphBuilder()
    with pytest.raises(Exception, match="get index 2 of"):
        g.op("get", g.op("fused", g.input("a", X), g.input("b", X), body=_body(), pattern=FusionPattern(None)), index=2)


def test_fused_nodes_and_kv_writes_interpret_as_their_bodies_and_stores():
    graph = _fused_graph(_body())
    x = torch.randn(3, 8)
    w = torch.randn(8, 8)
    out = interpret(graph, {"x": x}, {"w": w}, {})
    h = x + x @ w.T
    torch.testing.assert_close(out["h"], h)
    torch.testing.assert_close(out["n"], h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

    b = GraphBuilder()
    cache = b.state("cache", TensorType((NB, 4, 2, 4), "f32"))
    rows = b.op("reshape", b.input("x", X), shape=(T, 2, 4))
    written = b.op("kv_write", rows, cache, b.input("slots", TensorType((T,), "i32")))
    assert written.type == cache.type
    b.output("cache", written)
    states = {"cache": torch.zeros(3, 4, 2, 4)}
    result = interpret(b.build(), {"x": x, "slots": torch.tensor([5, -1, 0], dtype=torch.int32)}, {}, states)
    assert result["cache"] is states["cache"]
    expected = torch.zeros(3, 4, 2, 4)
    expected[1, 1], expected[0, 0] = x[0].reshape(2, 4), x[2].reshape(2, 4)  # slot 5 = block 1, row 1; -1 skipped
    assert torch.equal(states["cache"], expected)
    assert TupleType((X, X)) != TupleType((X, TensorType((T, 9), "f32")))
