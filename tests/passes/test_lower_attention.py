"""Attention lowering (KV writes + the phase's paged attention op) of dense, sliding-window and
block-sparse attention (computing what attention computes, in the interpreter and as the cpu
target renders it), and phase specialisation (T = B in the decode graph)."""

import dataclasses

import pytest
import torch

from kiln.codegen.cpu import render_cpu_program
from kiln.codegen.render import load_kernel_module
from kiln.ir import (
    NB,
    AttentionKind,
    AttentionSpec,
    B,
    BlockSparseLayout,
    GraphBuilder,
    T,
    TensorType,
    interpret,
)
from kiln.ir.step import STEP_INPUTS, PagedSequences
from kiln.passes import PassContext
from kiln.passes.lower_attention import lower_attention
from kiln.passes.specialize_phase import specialize_phase

SPEC = AttentionSpec(AttentionKind.SLIDING_WINDOW, num_heads=4, num_kv_heads=2, head_dim=8, window=5)
SPARSE = AttentionSpec(AttentionKind.BLOCK_SPARSE, num_heads=4, num_kv_heads=2, head_dim=8,
                       block_sparse=BlockSparseLayout(16, local_blocks=1, vertical_stride=2))
CONTEXT = ("query_start", "seq_lens", "block_tables", "slot_mapping")


def _attention_graph(spec=SPEC, tokens=T, layer=3):
    """attention(q, k, v) over q/k/v read from inputs of `tokens` rows (T, or B as in a decode graph)."""
    b = GraphBuilder()
    q = b.op("reshape", b.input("q", TensorType((tokens, 32), "f32")), shape=(tokens, 4, 8))
    k = b.op("reshape", b.input("k", TensorType((tokens, 16), "f32")), shape=(tokens, 2, 8))
    v = b.op("reshape", b.input("v", TensorType((tokens, 16), "f32")), shape=(tokens, 2, 8))
    caches = [b.state(f"{n}_cache.{layer}", TensorType((NB, 16, 2, 8), "f32")) for n in "kv"]
    ctx = [b.input(n, STEP_INPUTS[n].with_shape([d.subs(T, tokens) for d in STEP_INPUTS[n].shape])) for n in CONTEXT]
    sinks = [b.param("sinks", TensorType((4,), "f32"))] if spec.sinks else []
    b.output("out", b.op("attention", q, k, v, *caches, *ctx, *sinks, spec=spec, layer=layer))
    return b.build()


def _tokens(phase: str):
    return B if phase == "decode" else T  # lowering runs after specialize_phase


def _expected(phase: str, sinks: bool):
    spec, n = dataclasses.replace(SPEC, sinks=sinks), _tokens(phase)
    w = GraphBuilder()
    q = w.op("reshape", w.input("q", TensorType((n, 32), "f32")), shape=(n, 4, 8))
    k = w.op("reshape", w.input("k", TensorType((n, 16), "f32")), shape=(n, 2, 8))
    v = w.op("reshape", w.input("v", TensorType((n, 16), "f32")), shape=(n, 2, 8))
    k_cache, v_cache = (w.state(f"{n}_cache.3", TensorType((NB, 16, 2, 8), "f32")) for n in "kv")
    query_start, seq_lens, block_tables = (w.input(c, STEP_INPUTS[c]) for c in CONTEXT[:3])
    slots = w.input("slot_mapping", TensorType((n,), "i32"))
    extra = [w.param("sinks", TensorType((4,), "f32"))] if sinks else []
    k_cache = w.op("kv_write", k, k_cache, slots, layer=3)
    v_cache = w.op("kv_write", v, v_cache, slots, layer=3)
    if phase == "mixed":
        out = w.op("attention_prefill", q, k_cache, v_cache, query_start, seq_lens, block_tables, *extra, spec=spec, layer=3)
    else:
        out = w.op("attention_decode", q, k_cache, v_cache, seq_lens, block_tables, *extra, spec=spec, layer=3, split="auto")
    w.output("out", out)
    return w.build()


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("phase", ["mixed", "decode"])
def test_attention_becomes_kv_writes_and_the_phase_attention_op(assert_graph_equal, phase, sinks):
    graph = _attention_graph(dataclasses.replace(SPEC, sinks=sinks), tokens=_tokens(phase))
    assert_graph_equal(lower_attention(graph, PassContext(phase=phase)), _expected(phase, sinks))


@pytest.mark.parametrize("spec", [dataclasses.replace(SPEC, sinks=True), SPARSE, dataclasses.replace(SPARSE, sinks=True)],
                         ids=["window-sinks", "block-sparse", "block-sparse-sinks"])
@pytest.mark.parametrize("phase", ["mixed", "decode"])
def test_lowered_attention_computes_what_attention_computes(phase, spec):
    graph = _attention_graph(spec, tokens=_tokens(phase))
    lowered = lower_attention(graph, PassContext(phase=phase))
    assert {n.attrs["spec"] for n in lowered.nodes if n.op.startswith("attention_")} == {spec}
    pages = PagedSequences(num_blocks=12, block_size=16, seed=3)
    g = torch.Generator().manual_seed(0)
    # context already cached: a's queries (block 2) see layout blocks 1 (vertical) and 2, not 0
    pages.step([("a", list(range(40))), ("b", list(range(3)))])
    chunks = [("a", [1]), ("b", [2])] if phase == "decode" else [("a", [1, 2, 3]), ("b", [4]), ("c", [5] * 6)]
    step = pages.step(chunks)
    tokens = len(step["input_ids"])
    qkv = {n: torch.randn(tokens, d, generator=g) for n, d in (("q", 32), ("k", 16), ("v", 16))}
    inputs = {**{n: step[n] for n in CONTEXT}, **qkv}
    caches = {f"{n}_cache.3": torch.randn(12, 16, 2, 8, generator=g) for n in "kv"}
    weights = {"sinks": torch.randn(4, generator=g)}
    want_states, got_states = {k: v.clone() for k, v in caches.items()}, {k: v.clone() for k, v in caches.items()}
    want = interpret(graph, inputs, weights, want_states)["out"]
    got = interpret(lowered, inputs, weights, got_states)["out"]
    torch.testing.assert_close(got, want)
    for name in caches:
        assert torch.equal(got_states[name], want_states[name])
        assert not torch.equal(got_states[name], caches[name])
    # and as the cpu target renders it (cpu_ops with the spec's window, layout and sinks)
    program = load_kernel_module(render_cpu_program(lowered), f"test_lower_attention_{phase}")
    cpu_states = {k: v.clone() for k, v in caches.items()}
    torch.testing.assert_close(program.step(inputs, weights, cpu_states)["out"], want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(cpu_states[name], want_states[name]) for name in caches)


def test_the_decode_phase_sizes_every_token_dimension_by_the_batch(assert_graph_equal):
    decode = specialize_phase(_attention_graph(), PassContext(phase="decode"))
    assert_graph_equal(decode, _attention_graph(tokens=B))
    assert {n.name: n.type for n in decode.inputs}["slot_mapping"] == TensorType((B,), "i32")
    assert decode.name == "step_decode"
    mixed = specialize_phase(_attention_graph(), PassContext(phase="mixed"))
    assert_graph_equal(mixed, _attention_graph())
    assert mixed.name == "step_mixed"
