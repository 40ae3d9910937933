"""The sharding pass (tensor parallelism): every rank of the sharded graph, run side by side in
one process (interpret_ranks), gives the unsharded graph's logits and, re-assembled, its KV
cache and recurrent states, over a prefill, a decode step and a mixed step; a hand-written graph shards as written
out; the degrees a model does not fit are refused with the ones that fit."""

import pytest
import torch

from kiln.errors import KilnError
from kiln.frontend.tracer import trace
from kiln.ir import GraphBuilder, T, TensorType, interpret, interpret_ranks, verify
from kiln.ir.step import PagedSequences, zero_states
from kiln.models import build_spec
from kiln.passes import PassContext, PipelineOptions, materialize_weights, run_pipeline
from kiln.passes.pack_weights import pack_weights
from kiln.passes.quantize_weights import quantize_weights
from kiln.passes.shard import fitting_degrees, shard
from kiln.passes.shard_specs import CutDim, FirstRank, RankOffset, shard_weights
from kiln.quant import QuantFormat, QuantizedTensor, quantize

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
MODELS = {
    "llama": dict(architectures=["LlamaForCausalLM"], rope_theta=50000.0),
    "llama-mqa-tied": dict(architectures=["LlamaForCausalLM"], num_key_value_heads=1, tie_word_embeddings=True),
    "qwen2-bias": dict(architectures=["Qwen2ForCausalLM"]),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], head_dim=32, tie_word_embeddings=True),
    "olmo2": dict(architectures=["Olmo2ForCausalLM"]),  # q/k norms over every head: a sum over the ranks
    "qwen3-moe": dict(architectures=["Qwen3MoeForCausalLM"], head_dim=16, num_experts=8, num_experts_per_tok=3,
                      moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1]),
    # Gated DeltaNet layers around a gated full-attention layer: each rank's value heads and their key heads
    "qwen3-next": dict(architectures=["Qwen3NextForCausalLM"], num_hidden_layers=3, head_dim=16,
                       layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
                       linear_conv_kernel_dim=4, mlp_only_layers=[0, 1, 2]),
    "mamba2": dict(architectures=["Mamba2ForCausalLM"], layer_norm_epsilon=1e-5, num_heads=8, head_dim=16, expand=2,
                   state_size=16, n_groups=2, conv_kernel=4, chunk_size=16),  # no attention: only recurrent layers
}
MODELS["mamba2-one-group"] = {**MODELS["mamba2"], "n_groups": 1, "num_hidden_layers": 1}
SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)


def _model(name: str, helpers):
    spec = build_spec({**TINY, **MODELS[name]})
    return trace(spec), helpers.random_weights(spec)


def _run_ranks(graph, rank_weights: list[dict], steps) -> tuple[list[list[torch.Tensor]], list[dict]]:
    """Each step's logits on every rank, and every rank's KV cache after the steps."""
    pages, states = PagedSequences(num_blocks=48, block_size=16), [zero_states(graph, 48) for _ in rank_weights]
    logits = [[out["logits"] for out in interpret_ranks(graph, pages.step(chunks), rank_weights, states)]
              for chunks in steps]
    return logits, states


@pytest.mark.parametrize("name, tp", [
    ("llama", 2), ("llama", 4),  # tp 4 > 2 KV heads: each KV head serves two ranks
    ("llama-mqa-tied", 4), ("qwen2-bias", 2), ("qwen3", 2), ("qwen3", 4), ("qwen3-moe", 2),
    ("olmo2", 2), ("olmo2", 4),  # tp 4: its k norm spans 2 KV heads, each held by two ranks
    ("qwen3-next", 2), ("qwen3-next", 4),  # tp 4: each key head serves two ranks
    ("mamba2", 2),
    ("mamba2-one-group", 2), ("mamba2-one-group", 4),  # B, C whole; the gated norm over every head sums its squares
])
def test_the_ranks_together_compute_what_the_whole_graph_computes(name, tp, helpers):
    traced, weights = _model(name, helpers)
    sharded = shard(traced, tp)
    verify(sharded)
    steps = helpers.Scenario(vocab=TINY["vocab_size"]).steps  # a prefill, a decode step, a mixed step
    want, (whole_cache,) = _run_ranks(traced, [weights], steps)
    got, rank_caches = _run_ranks(sharded, [shard_weights(sharded, weights, r) for r in range(tp)], steps)
    for i, (logits, expected) in enumerate(zip(got, want)):
        for rank, rank_logits in enumerate(logits):
            torch.testing.assert_close(rank_logits, expected[0], atol=2e-5, rtol=0, msg=f"step {i}, rank {rank}")
    whole_types = {state.name: state.type for state in traced.states}
    for cache in sharded.states:  # KV caches, recurrent and conv states (whole on every rank: not cut)
        cut = cache.attrs.get("shard")
        assert cut is not None or cache.type == whole_types[cache.name]
        assert cut is None or sum(size // parts for size, parts in cut.segments) == cache.type.shape[cut.dim]
        joined = [states[cache.name] for states in rank_caches] if cut is None else [cut.join(
            [states[cache.name] for states in rank_caches])]
        for state in joined:
            torch.testing.assert_close(state, whole_cache[cache.name], atol=1e-5, rtol=1e-5, msg=cache.name)


def test_a_lowered_sharded_graph_keeps_the_numbers(helpers):
    traced, weights = _model("qwen3", helpers)
    sharded = shard(traced, 2)
    lowered, _ = run_pipeline(sharded, PipelineOptions(verify=True))
    steps = helpers.Scenario(vocab=TINY["vocab_size"]).steps
    want, _ = _run_ranks(traced, [weights], steps)
    ranks = [shard_weights(sharded, weights, r) for r in range(2)]
    got, _ = _run_ranks(lowered["mixed"], [materialize_weights(lowered["mixed"], w) for w in ranks], steps)
    for logits, expected in zip(got, want):
        for rank_logits in logits:
            torch.testing.assert_close(rank_logits, expected[0], atol=2e-5, rtol=0)
    ops = [n.op for n in lowered["decode"].nodes]
    assert ops.count("all_reduce") == 5 and ops[-1] == "all_gather"  # embedding, o_proj and down_proj per layer


def _mlp_and_router(tp: int | None):
    """A norm, a gated MLP (its gate/up packed) on a residual, a router (softmax over its linear)
    and an output head; with `tp`, the graph one rank of tp runs, as the pass should write it."""
    cut = (lambda dim, *segments: {"shard": CutDim(dim, tuple((s, tp) for s in segments), tp)}) if tp else None
    local = tp or 1
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 8), "f32"))
    h = b.op("rms_norm", x, b.param("norm.weight", TensorType((8,), "f32")), eps=1e-6)
    gate_up = b.op("linear", h, b.param("gate_up.weight", TensorType((24 // local, 8), "f32"), **(cut(0, 12, 12) if tp else {})))
    act = b.op("mul", b.op("silu", b.op("slice", gate_up, dim=1, start=0, stop=12 // local)),
               b.op("slice", gate_up, dim=1, start=12 // local, stop=24 // local))
    down = b.op("linear", act, b.param("down.weight", TensorType((8, 12 // local), "f32"), **(cut(1, 12) if tp else {})))
    residual = b.op("add", x, b.op("all_reduce", down, ranks=tp) if tp else down)
    b.output("probs", b.op("softmax", b.op("linear", h, b.param("router.weight", TensorType((4, 8), "f32"))), dim=1))
    head = b.op("linear", residual, b.param("head.weight", TensorType((16 // local, 8), "f32"), **(cut(0, 16) if tp else {})))
    b.output("logits", b.op("all_gather", head, dim=1, ranks=tp) if tp else head)
    return b.build()


def test_a_hand_written_graph_shards_as_written_out(assert_graph_equal):
    ctx = PassContext()
    assert_graph_equal(shard(_mlp_and_router(None), 2, ctx), _mlp_and_router(2))
    assert ctx.notes == ["router.weight output segment 0: whole on every rank (%9 softmax: softmax reduces over the cut dim)"]


def test_linears_sharded_apart_are_packed_from_the_ranks_shards():
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 8), "f32"))
    gate, up = (b.op("linear", x, b.param(f"{n}.weight", TensorType((12, 8), "f32"))) for n in ("gate", "up"))
    b.output("y", b.op("linear", b.op("mul", b.op("silu", gate), up), b.param("down.weight", TensorType((8, 12), "f32"))))
    graph = b.build()
    weights = {n: torch.randn(shape) for n, shape in (("gate.weight", (12, 8)), ("up.weight", (12, 8)),
                                                       ("down.weight", (8, 12)))}
    packed = pack_weights(shard(graph, 2))
    assert [p.name for p in packed.params] == ["gate+up.weight", "down.weight"]
    x = torch.randn(3, 8)
    ranks = [materialize_weights(packed, shard_weights(shard(graph, 2), weights, r)) for r in range(2)]
    for out in interpret_ranks(packed, {"x": x}, ranks, [{}, {}]):
        torch.testing.assert_close(out["y"], interpret(graph, {"x": x}, weights, {})["y"])


def test_vocab_parallel_embedding_and_replicated_kv_heads_are_data_on_the_graph(helpers):
    traced, _ = _model("qwen3", helpers)
    ctx = PassContext()
    sharded = shard(traced, 4, ctx)
    params = {p.name: p for p in sharded.params}
    assert params["model.embed_tokens.weight"].attrs["shard"] == CutDim(0, ((128, 4),), 4)
    assert params["model.embed_tokens.weight.vocab_start"].attrs["shard"] == RankOffset(32)
    assert params["model.layers.0.self_attn.qkv_proj.weight"].attrs["shard"] == CutDim(0, ((128, 4), (64, 2), (64, 2)), 4)
    assert "shard" not in params["model.layers.0.self_attn.q_norm.weight"].attrs  # norms stay whole
    spec = next(n for n in sharded.nodes if n.op == "attention").attrs["spec"]
    assert (spec.num_heads, spec.num_kv_heads) == (1, 1)
    assert "model.layers.0.self_attn.qkv_proj.weight output segment 1: cut into 2 blocks (%7 reshape: it makes the cut " \
           "dim 2 rows (heads, groups): fewer than 4 blocks)" in ctx.notes


def test_weight_shards_cut_and_join():
    full = torch.arange(12.0).reshape(6, 2)  # rows: a segment of 4 in 4 blocks, one of 2 in 2 (shared by rank pairs)
    cut = CutDim(0, ((4, 4), (2, 2)), 4)
    shards = [cut.take(full, r) for r in range(4)]
    assert [s[:, 0].tolist() for s in shards] == [[0, 8], [2, 8], [4, 10], [6, 10]]
    torch.testing.assert_close(cut.join(shards), full)
    assert FirstRank().take(full, 1).abs().sum() == 0 and FirstRank().take(full, 0) is full
    b = GraphBuilder()
    b.param("w", TensorType((3, 2), "f32"), shard=cut)
    with pytest.raises(KilnError, match=r"a weight of shape \(3, 2\) cannot be cut as cut\(dim=0, 4/4 \+ 2/2 of 4\)"):
        shard_weights(b.build(), {"w": torch.zeros(3, 2)}, 0)
    with pytest.raises(KilnError, match="the weights have no tensor 'w'"):
        shard_weights(b.build(), {}, 0)


def test_degrees_that_do_not_divide_the_heads_are_refused_with_those_that_fit():
    traced = trace(build_spec(SMOLLM2_135M))  # 9 heads, 3 KV heads
    with pytest.raises(KilnError, match=r"tensor-parallel degree 2 does not fit this model: it does not divide the 9 "
                                        r"attention heads; it neither divides the 3 KV heads nor is a multiple of them\. "
                                        r"Degrees that fit: 1, 3$"):
        shard(traced, 2)
    spec = next(n for n in shard(traced, 3).nodes if n.op == "attention").attrs["spec"]
    assert (spec.num_heads, spec.num_kv_heads) == (3, 1)
    with pytest.raises(KilnError, match=r"degree 9 does not fit this model: it does not divide the columns \(1536\) of "
                                        r"model\.layers\.\*\.mlp\.down_proj\.weight; .* the rows \(1536 \+ 1536\) of "
                                        r"model\.layers\.\*\.mlp\.gate_up_proj\.weight; .* the rows \(49152\) of "
                                        r"model\.embed_tokens\.weight\. Degrees that fit: 1, 3$"):
        shard(traced, 9)
    assert fitting_degrees(traced) == [1, 3]


@pytest.mark.parametrize("tp", [0, -2, 2.0])
def test_a_degree_is_a_whole_number_of_ranks(tp, helpers):
    traced, _ = _model("llama", helpers)
    with pytest.raises(KilnError, match="it must be a whole number of ranks, 1 or more"):
        shard(traced, tp)
    assert shard(traced, 1) is traced


def test_a_mixer_whose_norm_groups_span_ranks_runs_whole_on_every_rank_and_says_why(helpers):
    """Mamba2 with 2 groups over 4 ranks: a rank's heads would hold half of a group of its gated
    norm (a cut across two dims), so each rank runs the whole mixer."""
    traced, weights = _model("mamba2", helpers)
    ctx = PassContext()
    sharded = shard(traced, 4, ctx)
    assert not any("shard" in state.attrs for state in sharded.states)
    assert not any("shard" in p.attrs for p in sharded.params if ".mixer." in p.name)
    assert "backbone.layers.0.mixer.in_proj.weight output segment 1: cut into 2 blocks (%37 reshape: it makes the cut " \
           "dim 2 rows (heads, groups): fewer than 4 blocks)" in ctx.notes
    steps = helpers.Scenario(vocab=TINY["vocab_size"]).steps
    want, _ = _run_ranks(traced, [weights], steps)
    got, _ = _run_ranks(sharded, [shard_weights(sharded, weights, r) for r in range(4)], steps)
    for step_logits, (expected,) in zip(got, want):
        for rank_logits in step_logits:
            torch.testing.assert_close(rank_logits, expected, atol=2e-5, rtol=0)


def test_what_cannot_be_sharded_yet_is_refused(helpers):
    traced, _ = _model("llama", helpers)
    with pytest.raises(KilnError, match="shard runs once, on a traced graph, but this one holds all_gather, all_reduce"):
        shard(shard(traced, 2), 2)
    with pytest.raises(KilnError, match="degree 8 does not fit .* Degrees that fit: 1, 2, 4$"):
        shard(traced, 8)


@pytest.mark.parametrize("name, kind, tp", [("llama", "int8", 2), ("llama-mqa-tied", "int8", 4), ("llama", "int4", 2)])
def test_quantized_weights_are_cut_still_quantized(name, kind, tp, helpers):
    """`--quant` weights sharded: each rank's cut is a QuantizedTensor in the format its graph's
    param names (int8's one scale per row: the group shrinks to the rank's columns; int4: groups
    chosen to fit them), and the ranks together compute what the whole quantized graph computes."""
    spec = build_spec({**TINY, **MODELS[name], "intermediate_size": 128})  # int4 at tp 2: 64 columns a rank
    traced, weights = trace(spec), helpers.random_weights(spec)
    marked = quantize_weights(traced, {}, kind, tp=tp)
    formats = {p.name: p.attrs["quant"] for p in marked.params if "quant" in p.attrs}
    weights = {**weights, **{name: quantize(weights[name], fmt) for name, fmt in formats.items()}}
    sharded = shard(marked, tp)
    ranks = [shard_weights(sharded, weights, r) for r in range(tp)]
    params = {p.name: p for p in sharded.params}
    for pname in formats:
        local = params[pname].attrs["quant"]
        assert all(isinstance(r[pname], QuantizedTensor) and r[pname].format == local for r in ranks), pname
    o_proj = params["model.layers.0.self_attn.o_proj.weight"]  # row-parallel: 64 columns cut in tp blocks
    assert o_proj.attrs["quant"] == (QuantFormat("int8", 64 // tp, "f32") if kind == "int8" else QuantFormat("int4", 32, "f16"))
    steps = helpers.Scenario(vocab=TINY["vocab_size"]).steps
    want, _ = _run_ranks(marked, [weights], steps)
    got, _ = _run_ranks(sharded, ranks, steps)
    for logits, expected in zip(got, want):
        for rank_logits in logits:
            torch.testing.assert_close(rank_logits, expected[0], atol=2e-5, rtol=0)


def test_quantized_cuts_keep_whole_groups():
    """A rank's columns of a grouped format are whole groups of the full weight's (dequantized, its
    values are the full weight's); a cut through a group is refused, naming the weight."""
    full = quantize(torch.randn(6, 128), QuantFormat("int4", 32, "f16"))
    cut = CutDim(1, ((128, 2),), 2)
    for rank in range(2):
        torch.testing.assert_close(cut.take(full, rank).dequantize(), full.dequantize()[:, 64 * rank:64 * (rank + 1)],
                                   rtol=0, atol=0)
    rows = CutDim(0, ((6, 2),), 2).take(full, 1)
    torch.testing.assert_close(rows.dequantize(), full.dequantize()[3:], rtol=0, atol=0)
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 64), "f32"))
    b.output("y", b.op("linear", b.op("linear", x, b.param("up.weight", TensorType((64, 64), "f32"))),
                       b.param("down.weight", TensorType((64, 64), "f32"))))
    marked = quantize_weights(b.build(), {"down.weight": QuantFormat("int4", 64, "f16")})
    with pytest.raises(KilnError, match=r"down.weight: a int4-g64-f16 weight of 64 columns cannot be cut into blocks of "
                                        r"32 columns for 2 ranks: the blocks must hold whole groups of 64. Compile with "
                                        "--dequantize"):
        shard(marked, 2)


def test_tp_one_interprets_as_before(helpers):
    traced, weights = _model("llama", helpers)
    pages = PagedSequences(num_blocks=8, block_size=16)
    inputs = pages.step([("a", [1, 2, 3])])
    torch.testing.assert_close(interpret(shard(traced, 1), inputs, weights, zero_states(traced, 8))["logits"],
                               interpret(traced, inputs, weights, zero_states(traced, 8))["logits"])


def test_kiln_compile_tp_checks_the_degree_and_writes_a_tensor_parallel_artifact(tmp_path):
    """`kiln compile --tp N` on the shipped SmolLM2 (9 heads, 3 KV heads) for h100: 2 is refused
    with the degrees that fit; 3 writes an artifact of three ranks' weights files (its GGUF's Q4_1
    weights still quantized: each rank's 192 of o_proj's 576 columns are 6 whole groups of 32) whose
    cross-compiled programs call the collectives, and rank 0's IR (collectives included) in --dump-ir."""
    from kiln.compiler import CompileOptions, compile_model
    from kiln.runtime.artifact import load_artifact

    with pytest.raises(KilnError, match="Degrees that fit: 1, 3"):
        compile_model("smollm2-135m", tmp_path / "tp2", CompileOptions(target="h100", tp=2), progress=False)
    summary = compile_model("smollm2-135m", tmp_path / "tp3", CompileOptions(target="h100", tp=3,
                                                                             dump_ir=tmp_path / "ir"), progress=False)
    assert any("tensor parallel: 3 ranks" in line for line in summary.lines())
    artifact = load_artifact(tmp_path / "tp3", check_hashes=False)
    assert artifact.tensor_parallel == 3 and artifact.weights_file(2).name == "weights.rank2.safetensors"
    quantized = artifact.manifest.quantized_weights
    assert quantized["model.layers.0.self_attn.o_proj.weight"] == "int4-g32-f16"
    assert 3 * artifact.weights_file(1).stat().st_size < 1.5 * 98.4e6  # three ranks hold about the GGUF file's bytes
    assert all(page == (16, 1, 64) for page in artifact.manifest.groups[0].pages)  # 1 of the 3 KV heads per rank
    program = (tmp_path / "tp3" / "program.decode.py").read_text()
    assert program.count("comm.all_reduce(") == 2 * 30 + 1 and program.count("comm.all_gather(") == 1
    traced = (tmp_path / "ir" / "00-traced.txt").read_text()
    assert traced.count("all_reduce(") == 2 * 30 + 1 and "all_gather(" in traced  # per layer o and down; embedding
    assert "bf16[T, 3, 64]" in traced  # 3 of the 9 heads on each rank
