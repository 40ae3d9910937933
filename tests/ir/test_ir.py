"""IR core: printer text, verifier rejections, symbolic shape propagation, interpreter checks."""

import pytest
import torch

from kiln.frontend.tracer import StepConfig, trace
from kiln.ir import (
    NB,
    AttentionKind,
    AttentionSpec,
    B,
    GraphBuilder,
    InterpretError,
    Node,
    T,
    TensorType,
    interpret,
    print_graph,
    verify,
)
from kiln.ir.graph import Graph
from kiln.ir.step import STEP_INPUTS
from kiln.ir.verify import VerifyError
from kiln.models import build_spec


def small_graph() -> Graph:
    b = GraphBuilder("mlp")
    x = b.input("x", TensorType((T, 8), "f32"))
    w = b.param("up.weight", TensorType((32, 8), "f32"))
    h = b.op("linear", x, w)
    gate, up = b.op("slice", h, dim=1, start=0, stop=16), b.op("slice", h, dim=1, start=16, stop=32)
    y = b.op("mul", b.op("silu", gate), up)
    b.output("y", b.op("add", y, b.op("const", value=0.5, dtype="f32")))
    return b.build()


def test_printer_text_is_exact():
    assert print_graph(small_graph()) == (
        "graph mlp(T)\n"
        "  %x = input : f32[T, 8]\n"
        "  @up.weight = param : f32[32, 8]\n"
        "  %0 = linear(%x, @up.weight) : f32[T, 32]\n"
        "  %1 = slice(%0, dim=1, start=0, stop=16) : f32[T, 16]\n"
        "  %2 = slice(%0, dim=1, start=16, stop=32) : f32[T, 16]\n"
        "  %3 = silu(%1) : f32[T, 16]\n"
        "  %4 = mul(%3, %2) : f32[T, 16]\n"
        "  %5 = const(dtype=f32, value=0.5) : f32[]\n"
        "  %6 = add(%4, %5) : f32[T, 16]\n"
        "  return y=%6\n"
    )


def test_printer_is_stable_across_traces():
    config = dict(architectures=["LlamaForCausalLM"], vocab_size=50, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
    first, second = print_graph(trace(build_spec(config))), print_graph(trace(build_spec(config)))
    assert first == second
    assert "attention(%9, %10, %8, &k_cache.0, &v_cache.0, %query_start" in first
    assert first.splitlines()[-1] == "  return logits=%47"


def test_symbols_stay_symbolic_through_the_traced_graph():
    config = dict(architectures=["Qwen3ForCausalLM"], vocab_size=50, hidden_size=32, intermediate_size=48, head_dim=16,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
    graph = trace(build_spec(config), StepConfig(dtype="bf16", block_size=32))
    by_op = {}
    for n in graph.nodes:
        by_op.setdefault(n.op, n)
    assert by_op["embedding"].type == TensorType((T, 32), "bf16")
    assert by_op["rope"].type == TensorType((T, 4, 16), "bf16")
    assert by_op["state"].type == TensorType((NB, 32, 2, 16), "bf16")
    assert graph.outputs["logits"].type == TensorType((B, 50), "bf16")
    assert STEP_INPUTS["query_start"].shape == (B + 1,)
    assert all(d.free_symbols <= {T, B} for n in graph.nodes if n.op != "state" for d in n.type.shape if n.op != "input")


def _rebuilt(graph: Graph, edit) -> Graph:
    nodes = list(graph.nodes)
    edit(nodes)
    return Graph(nodes, dict(graph.outputs), graph.name)


def test_verifier_accepts_a_good_graph():
    verify(small_graph())


def test_verifier_rejects_use_before_definition():
    g = small_graph()
    bad = _rebuilt(g, lambda nodes: nodes.insert(2, nodes.pop(5)))  # silu before its input slice
    with pytest.raises(VerifyError, match=r"%\d+ = silu.*defined later in the graph"):
        verify(bad)


def test_verifier_rejects_a_wrong_recorded_type():
    g = small_graph()
    silu = next(n for n in g.nodes if n.op == "silu")
    silu.type = TensorType((T, 17), "f32")
    with pytest.raises(VerifyError, match=r"silu.*recorded type f32\[T, 17\] but its inputs give f32\[T, 16\]"):
        verify(g)


def test_verifier_rejects_an_ill_typed_node():
    g = small_graph()
    x = g.inputs[0]
    w = TensorType((32, 9), "f32")
    bad_linear = Node("linear", (x, Node("param", (), {"name": "w", "type": w}, w)), {}, TensorType((T, 32), "f32"))
    bad = _rebuilt(g, lambda nodes: nodes.extend([bad_linear.inputs[1], bad_linear]))
    with pytest.raises(VerifyError, match=r"linear.*ill-typed: x f32\[T, 8\] @ w"):
        verify(bad)


def test_verifier_rejects_unknown_ops_bad_arity_and_dangling_outputs():
    g = small_graph()
    x = g.inputs[0]
    with pytest.raises(VerifyError, match="unknown op 'softmax2'"):
        verify(_rebuilt(g, lambda nodes: nodes.append(Node("softmax2", (x,), {}, x.type))))
    with pytest.raises(VerifyError, match="silu takes 1..1 inputs, got 2"):
        verify(_rebuilt(g, lambda nodes: nodes.append(Node("silu", (x, x), {}, x.type))))
    stray = Node("neg", (x,), {}, x.type)
    with pytest.raises(VerifyError, match="output 'z' is not a node of the graph"):
        verify(Graph(g.nodes, {**g.outputs, "z": stray}, g.name))


def test_verifier_rejects_duplicate_source_names():
    g = small_graph()
    dup = Node("input", (), {"name": "x", "type": g.inputs[0].type}, g.inputs[0].type)
    with pytest.raises(VerifyError, match="input name 'x' is declared twice"):
        verify(_rebuilt(g, lambda nodes: nodes.insert(1, dup)))


def test_builder_rejects_shapes_that_do_not_broadcast():
    b = GraphBuilder()
    x, y = b.input("x", TensorType((T, 8), "f32")), b.input("y", TensorType((T, 9), "f32"))
    with pytest.raises(Exception, match="do not broadcast"):
        b.op("add", x, y)


def test_interpreter_matches_torch_and_checks_its_inputs():
    g = small_graph()
    x, w = torch.randn(5, 8), torch.randn(32, 8)
    h = x @ w.T
    expected = torch.nn.functional.silu(h[:, :16]) * h[:, 16:] + 0.5
    assert torch.allclose(interpret(g, {"x": x}, {"up.weight": w}, {})["y"], expected)
    with pytest.raises(InterpretError, match="missing param 'up.weight'"):
        interpret(g, {"x": x}, {}, {})
    with pytest.raises(InterpretError, match=r"input 'x': expected shape \(5, 8\)|input 'x': expected f32\[T, 8\]"):
        interpret(g, {"x": torch.randn(5, 7)}, {"up.weight": w}, {})


def test_attention_spec_validates_its_variant():
    with pytest.raises(ValueError, match="sliding_window attention needs `window`"):
        AttentionSpec(AttentionKind.SLIDING_WINDOW, 4, 2, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        AttentionSpec(AttentionKind.DENSE, 9, 2, 64)
    assert str(AttentionSpec(AttentionKind.SLIDING_WINDOW, 9, 3, 64, window=512)) == \
        "sliding_window(h=9, kv=3, d=64, causal, window=512, block=16)"
