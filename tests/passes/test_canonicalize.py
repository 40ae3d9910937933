"""Canonicalization passes: dead-code elimination, common-subexpression elimination, constant
folding. Each with a hand-written input graph, the hand-written expected graph, and the
interpreter's outputs compared before and after."""

import torch

from kiln.ir import NB, GraphBuilder, T, TensorType, interpret
from kiln.passes.cse import eliminate_common_subexpressions
from kiln.passes.dce import eliminate_dead_code
from kiln.passes.fold_constants import fold_constants

X = TensorType((T, 8), "f32")
ROWS = TensorType((T, 2, 4), "f32")
CACHE = TensorType((NB, 16, 2, 4), "f32")
SLOTS = TensorType((T,), "i32")


def _run(graph, x, cache=None):
    inputs = {"x": x, "slot_mapping": torch.arange(len(x), dtype=torch.int32)}
    states = {"cache": cache} if cache is not None else {}
    return interpret(graph, {k: v for k, v in inputs.items() if k in {n.name for n in graph.inputs}}, {}, states)


def test_dead_code_goes_but_kv_writes_and_step_inputs_stay(assert_graph_equal):
    b = GraphBuilder()
    x, slots, cache = b.input("x", X), b.input("slot_mapping", SLOTS), b.state("cache", CACHE)
    unused_input = b.input("positions", SLOTS)
    b.op("silu", b.op("mul", x, b.param("w", TensorType((8,), "f32"))))  # dead, with a dead weight
    b.op("kv_write", b.op("reshape", x, shape=(T, 2, 4)), cache, slots)  # result unused: still a write
    b.output("y", b.op("neg", x))
    got = eliminate_dead_code(b.build())

    w = GraphBuilder()
    x, slots, cache = w.input("x", X), w.input("slot_mapping", SLOTS), w.state("cache", CACHE)
    w.input("positions", SLOTS)
    w.op("kv_write", w.op("reshape", x, shape=(T, 2, 4)), cache, slots)
    w.output("y", w.op("neg", x))
    assert_graph_equal(got, w.build())
    assert unused_input in got.nodes


def test_repeated_computations_merge_but_writes_do_not(assert_graph_equal):
    b = GraphBuilder()
    x, slots, cache = b.input("x", X), b.input("slot_mapping", SLOTS), b.state("cache", CACHE)
    rows = b.op("reshape", x, shape=(T, 2, 4))
    b.op("kv_write", rows, cache, slots)
    b.op("kv_write", b.op("reshape", x, shape=(T, 2, 4)), cache, slots)
    b.output("y", b.op("add", b.op("silu", x), b.op("silu", x)))
    before = b.build()
    got = eliminate_common_subexpressions(before)

    w = GraphBuilder()
    x, slots, cache = w.input("x", X), w.input("slot_mapping", SLOTS), w.state("cache", CACHE)
    rows = w.op("reshape", x, shape=(T, 2, 4))
    w.op("kv_write", rows, cache, slots)
    w.op("kv_write", rows, cache, slots)
    silu = w.op("silu", x)
    w.output("y", w.op("add", silu, silu))
    assert_graph_equal(got, w.build())
    x = torch.randn(5, 8)
    caches = [torch.zeros(4, 16, 2, 4) for _ in range(2)]
    assert torch.equal(_run(before, x, caches[0])["y"], _run(got, x, caches[1])["y"])
    assert torch.equal(caches[0], caches[1])


def test_constants_fold_and_identity_ops_vanish(assert_graph_equal):
    b = GraphBuilder()
    x = b.input("x", X)
    six = b.op("mul", b.op("const", value=2.0, dtype="f32"), b.op("const", value=3.0, dtype="f32"))
    y = b.op("add", b.op("reshape", b.op("reshape", x, shape=(T, 2, 4)), shape=(T, 8)), six)
    y = b.op("mul", b.op("cast", y, dtype="f32"), b.op("const", value=1.0, dtype="f32"))
    y = b.op("slice", b.op("sub", y, b.op("const", value=0.0, dtype="f32")), dim=1, start=0, stop=8)
    b.output("y", b.op("div", y, b.op("const", value=2.0, dtype="f32")))
    before = b.build()
    got = fold_constants(before)

    w = GraphBuilder()
    x = w.input("x", X)
    y = w.op("add", x, w.op("const", value=6.0, dtype="f32"))
    w.output("y", w.op("div", y, w.op("const", value=2.0, dtype="f32")))
    assert_graph_equal(got, w.build())
    x = torch.randn(3, 8)
    assert torch.equal(_run(before, x)["y"], _run(got, x)["y"])
    assert torch.equal(_run(got, x)["y"], (x + 6) / 2)
