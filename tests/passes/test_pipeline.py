"""The whole pipeline and each of its steps keep the interpreter's numbers, for every Llama-family
member kiln supports, over mixed prefill+decode steps and a decode-only step; and the dump."""

import pytest

from kiln.frontend.tracer import StepConfig, trace
from kiln.ir import B, T, print_graph, verify
from kiln.models import build_spec
from kiln.passes import PassContext, materialize_weights, run_pipeline
from kiln.passes.pipeline import PHASE_STEPS, SHARED_STEPS, PipelineOptions

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILIES = {  # the tiny configs of tests/e2e/test_families.py
    "llama3-scaled": dict(architectures=["LlamaForCausalLM"], rope_theta=50000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "smollm2-tied": dict(architectures=["LlamaForCausalLM"], tie_word_embeddings=True, rope_theta=100000.0,
                         num_key_value_heads=1),
    "qwen2-bias": dict(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False),
    "qwen3-qknorm": dict(architectures=["Qwen3ForCausalLM"], head_dim=32, tie_word_embeddings=True),
    "mistral-sliding-window": dict(architectures=["MistralForCausalLM"], sliding_window=7, head_dim=16),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_step_keeps_the_numbers(family, helpers):
    spec = build_spec({**TINY, **FAMILIES[family]})
    traced = trace(spec)
    weights = helpers.random_weights(spec)
    scenario = helpers.Scenario(vocab=TINY["vocab_size"])
    want = scenario.run([traced] * 3, [weights] * 3)

    def check(graph, label, phase):
        verify(graph)
        w = materialize_weights(graph, weights)
        # a mixed-phase graph serves every step; a decode graph serves the decode-only step
        graphs = [graph] * 3 if phase != "decode" else [traced, graph, traced]
        ws = [w] * 3 if phase != "decode" else [weights, w, weights]
        for i, (got, expected) in enumerate(zip(scenario.run(graphs, ws), want)):
            err = (got - expected).abs().max().item()
            assert err < 2e-5, f"{family}, after {label}: step {i} logits differ by {err:.2e}"

    shared, ctx = traced, PassContext()
    for step in SHARED_STEPS:
        shared = step.run(shared, ctx)
        check(shared, step.name, "shared")
    for phase in ("mixed", "decode"):
        graph, ctx = shared, PassContext(phase=phase)
        for step in PHASE_STEPS:
            graph = step.run(graph, ctx)
            check(graph, f"{phase}/{step.name}", phase)
    lowered, _ = run_pipeline(traced, PipelineOptions(verify=True))
    for phase in lowered:  # the pipeline gives what the steps gave
        assert print_graph(lowered[phase]) == print_graph(
            _run_steps(shared, phase)), f"run_pipeline differs from its steps in {phase}"


def _run_steps(shared, phase):
    ctx = PassContext(phase=phase)
    for step in PHASE_STEPS:
        shared = step.run(shared, ctx)
    return shared


def test_the_dump_holds_every_step_the_fusion_decisions_and_the_report(tmp_path):
    spec = build_spec({**TINY, **FAMILIES["smollm2-tied"]})
    lowered, report = run_pipeline(trace(spec), PipelineOptions(dump_dir=tmp_path, verify=True))
    names = [f"{i:02d}-{s.name}.txt" for i, s in enumerate(SHARED_STEPS, start=1)]
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == ["00-traced.txt", *names, "report.txt"]
    for phase in ("mixed", "decode"):
        phase_names = [f"{i:02d}-{s.name}.txt" for i, s in enumerate(PHASE_STEPS, start=len(SHARED_STEPS) + 1)]
        assert sorted(p.name for p in (tmp_path / phase).glob("*.txt")) == sorted([*phase_names, "fusion.txt"])
        last = (tmp_path / phase / phase_names[-1]).read_text()
        assert last.endswith(print_graph(lowered[phase]))
        decisions = (tmp_path / phase / "fusion.txt").read_text()
        assert "kept apart" in decisions and "runs as its own kernel" in decisions
        assert f"launches: {report.launches(phase)[0]} before fusion, {report.launches(phase)[1]} after" in decisions
    folded = (tmp_path / "06-fold_norm_weights.txt").read_text()
    assert folded.startswith("# not folded model.norm.weight: model.embed_tokens.weight is also read by embedding")
    summary = (tmp_path / "report.txt").read_text()
    assert "mixed: 15.50 -> 6.00 launches per decoder layer (34 -> 14 per step)" in summary
    assert f"peak activations {report.peak_activation_bytes['decode']} bytes" in summary


def test_a_bf16_graph_lowers_with_bf16_buffers_sized_by_the_step():
    traced = trace(build_spec({**TINY, **FAMILIES["qwen2-bias"]}), StepConfig(dtype="bf16"))
    lowered, report = run_pipeline(traced, PipelineOptions(verify=True))
    assert {b.dtype for g in lowered.values() for b in g.buffers} == {"bf16"}
    assert report.peak_activation_bytes["mixed"].free_symbols == {T, B}
    assert report.peak_activation_bytes["decode"].free_symbols == {B}
