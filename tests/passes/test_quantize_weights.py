"""Quantized weights through the passes: which params stay quantized, packing and norm folding
around them, and materialize_weights / the interpreter reading them (against dequantized ones)."""

import pytest
import torch

from kiln.errors import KilnError
from kiln.ir import GraphBuilder, T, TensorType, interpret
from kiln.passes import PassContext, materialize_weights
from kiln.passes.fold_norm_weights import fold_norm_weights
from kiln.passes.pack_weights import pack_weights
from kiln.passes.quantize_weights import quantize_weights, requested_format
from kiln.quant import QuantFormat, QuantizedTensor, quantize

Q4 = QuantFormat("int4", 32, "f16")
Q8 = QuantFormat("int8", 32, "f16")


def f32(*shape):
    return TensorType(shape, "f32")


def _graph():
    """norm -> q/k linears (one input: packable), an embedding table also read as the LM head
    (tied), and a linear whose weight is also multiplied elementwise (cannot stay quantized)."""
    b = GraphBuilder()
    x, ids = b.input("x", f32(T, 64)), b.input("ids", TensorType((T,), "i32"))
    normed = b.op("rms_norm", x, b.param("norm.weight", f32(64)), eps=1e-6)
    q = b.op("linear", normed, b.param("q.weight", f32(64, 64)))
    k = b.op("linear", normed, b.param("k.weight", f32(32, 64)))
    table = b.param("embed.weight", f32(100, 64))
    h = b.op("add", b.op("embedding", table, ids), b.op("slice", b.op("add", q, q), dim=1, start=0, stop=64))
    odd = b.param("odd.weight", f32(64, 64))
    b.output("logits", b.op("linear", h, table))
    b.output("k", k)
    b.output("odd", b.op("add", b.op("linear", x, odd), b.op("slice", odd, dim=0, start=0, stop=1)))
    return b.build()


def _formats(graph):
    return {p.name: p.attrs.get("quant") for p in graph.params}


def test_stored_formats_stay_where_only_linears_and_embeddings_read_them():
    ctx = PassContext()
    stored = {"q.weight": Q4, "k.weight": Q4, "embed.weight": Q8, "odd.weight": Q4, "norm.weight": Q4}
    got = _formats(quantize_weights(_graph(), stored, None, ctx))
    assert got == {"norm.weight": None, "q.weight": Q4, "k.weight": Q4, "embed.weight": Q8, "odd.weight": None}
    assert any("odd.weight dequantized: slice reads it" in note for note in ctx.notes)
    assert any("norm.weight dequantized: rms_norm reads it" in note for note in ctx.notes)


def test_requested_kind_quantizes_linear_weights_and_tied_tables():
    got = _formats(quantize_weights(_graph(), {}, "int4"))
    # the tied table (also the LM head) in int8, the norm is no linear weight, odd is sliced
    assert got == {"norm.weight": None, "q.weight": QuantFormat("int4", 64, "f16"),
                   "k.weight": QuantFormat("int4", 64, "f16"), "embed.weight": QuantFormat("int8", 64, "f32"),
                   "odd.weight": None}
    assert _formats(quantize_weights(_graph(), {}, "fp8"))["embed.weight"] == QuantFormat("fp8e4m3", 64, "f32")
    assert requested_format("int4", 4096) == QuantFormat("int4", 128, "f16")
    assert requested_format("int8", 576) == QuantFormat("int8", 576, "f32")
    assert requested_format("fp8", 576) == QuantFormat("fp8e4m3", 576, "f32")
    with pytest.raises(KilnError, match="groups of 32"):
        requested_format("int4", 100)


def test_packing_keeps_one_format_and_norms_do_not_fold_into_quantized_weights():
    ctx = PassContext()
    graph = fold_norm_weights(pack_weights(quantize_weights(_graph(), {"q.weight": Q4, "k.weight": Q4}), ctx), ctx)
    packed = [p for p in graph.params if "+" in p.name]
    assert [(p.name, p.attrs["quant"]) for p in packed] == [("q+k.weight", Q4)]
    assert "norm.weight" in {p.name for p in graph.params}  # not folded
    assert any("is quantized" in note for note in ctx.notes)

    mixed = pack_weights(quantize_weights(_graph(), {"q.weight": Q4, "k.weight": Q8}), ctx)
    assert not any("+" in p.name for p in mixed.params)
    assert any("differ in quantization format" in note for note in ctx.notes)


def test_materialized_quantized_weights_interpret_as_their_dequantized_values():
    torch.manual_seed(0)
    source = _graph()
    dense = {p.name: torch.randn(p.type.concrete_shape({})) for p in source.params}
    stored = {"q.weight": Q4, "k.weight": Q4, "embed.weight": Q8}
    quantized = {name: quantize(w, stored[name]) if name in stored else w for name, w in dense.items()}
    graph = fold_norm_weights(pack_weights(quantize_weights(source, stored)))
    weights = materialize_weights(graph, quantized)
    assert isinstance(weights["q+k.weight"], QuantizedTensor)
    assert torch.equal(weights["q+k.weight"].dequantize(),
                       torch.cat([quantized["q.weight"].dequantize(), quantized["k.weight"].dequantize()]))
    inputs = {"x": torch.randn(3, 64), "ids": torch.tensor([1, 5, 99], dtype=torch.int32)}
    reference = {n: w.dequantize() if isinstance(w, QuantizedTensor) else w for n, w in quantized.items()}
    want = interpret(source, inputs, reference, {})
    got = interpret(graph, inputs, weights, {})
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_a_weight_of_another_format_is_refused():
    graph = quantize_weights(_graph(), {"q.weight": Q4})
    dense = {p.name: torch.randn(p.type.concrete_shape({})) for p in graph.params}
    with pytest.raises(KilnError, match="int4-g32-f16"):
        materialize_weights(graph, {**dense, "q.weight": quantize(dense["q.weight"], Q8)})
