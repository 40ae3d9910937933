"""Generated GPU step programs, run with their Triton kernels under the interpreter, against the
reference interpreter on the same lowered graphs: mixed prefill+decode and decode-only steps on
one paged KV cache, fp32 (tight) and bf16 (dtype tolerance), Llama-family variants, split-K
decode; and the program's form (one launch per lowered node, the memory plan's buffers)."""

import re

import pytest
import torch

from kiln.codegen.gpu_program import build_gpu_program
from kiln.codegen.targets import get_target
from kiln.frontend.tracer import trace
from kiln.ir.step import PagedSequences, zero_states
from kiln.models import build_spec
from kiln.passes import run_pipeline

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),  # silu tails, interpreted
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # interpreter loops
]


def run_steps(model, steps, num_blocks=64):
    """Logits of every step from the generated program and from the reference interpreter, each
    on its own KV cache; and the two caches at the end."""
    ours, theirs = zero_states(model.graphs["mixed"], num_blocks), zero_states(model.graphs["mixed"], num_blocks)
    pairs = [(model.run(phase, inputs, ours), model.reference(phase, inputs, theirs)) for phase, inputs in steps]
    return pairs, ours, theirs


def test_tiny_llama_fp32_matches_the_reference_over_mixed_and_decode_steps(compile_tiny, helpers):
    model = compile_tiny()
    pairs, ours, theirs = run_steps(model, helpers.step_inputs())
    for step, (got, want) in enumerate(pairs):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 2e-5 * want.abs().max(), f"step {step}"
    for name in ours:  # the kernels wrote the same K/V (the rope + KV write kernel)
        assert (ours[name] - theirs[name]).abs().max() <= 1e-5, name


def test_tiny_llama_bf16_is_as_close_to_fp32_as_the_bf16_reference(compile_tiny, helpers):
    """bf16 kernels vs the fp32 model: no further off than the reference interpreter in bf16."""
    model, exact = compile_tiny(dtype="bf16"), compile_tiny(dtype="f32")
    steps = helpers.step_inputs()
    pairs, _, _ = run_steps(model, steps)
    exact_states = zero_states(exact.graphs["mixed"], 64)
    for (phase, inputs), (got, same_dtype) in zip(steps, pairs):
        assert got.dtype == torch.bfloat16
        helpers.check_close(got, exact.reference(phase, inputs, exact_states), same_dtype, slack=2.0)


FAMILIES = {  # the Llama-family variants the GPU kernels serve, with what each one exercises
    "llama3-rope-scaling": dict(rope_theta=50000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),  # inv_freq table from the scaled spec
    "qwen2-qkv-bias": dict(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False),  # gemm bias epilogue
    "mistral-sliding-window": dict(architectures=["MistralForCausalLM"], sliding_window=7, head_dim=16),
    # per-head q/k norms + rope + KV writes in one row kernel
    "qwen3-qk-norm": dict(architectures=["Qwen3ForCausalLM"], head_dim=32),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_family_variants_match_the_reference(compile_tiny, helpers, family):
    model = compile_tiny({**helpers.TINY_LLAMA, **FAMILIES[family]})
    for step, (got, want) in enumerate(run_steps(model, helpers.step_inputs())[0]):
        assert (got - want).abs().max() <= 2e-5 * want.abs().max(), f"{family}, step {step}"


def test_split_k_decode_over_a_long_context_matches_the_reference(compile_tiny, helpers):
    """On a GPU target a small decode batch over long contexts takes the split-K path
    (attention_decode with partials, then attention_reduce); b200's tiles, interpreted."""
    model = compile_tiny(target="b200")
    pages = PagedSequences(96, block_size=16, seed=3)
    pages.step([("a", [0] * 599), ("b", [0] * 290)])  # the contexts' blocks (their K/V: random below)
    inputs = pages.step([("a", [5]), ("b", [7])])
    ours = {name: torch.randn(cache.shape, generator=torch.Generator().manual_seed(len(name)))
            for name, cache in zero_states(model.graphs["decode"], 96).items()}
    theirs = {name: cache.clone() for name, cache in ours.items()}
    launched = []
    launch = model.launcher.launch
    model.launcher.launch = lambda kernel, *args: launched.append(kernel.name) or launch(kernel, *args)
    got, want = model.run("decode", inputs, ours), model.reference("decode", inputs, theirs)
    assert any("__splitk__" in name for name in launched) and any(n.startswith("attention_reduce") for n in launched)
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()


def test_the_program_launches_one_kernel_per_lowered_node_into_the_planned_buffers(helpers):
    graphs, _ = run_pipeline(trace(build_spec(helpers.TINY_LLAMA)))
    program = build_gpu_program(graphs, get_target("cpu"))
    for phase, graph in graphs.items():
        source = program.sources[phase]
        launches = [n for n in graph.nodes if n.op not in ("input", "param", "state", "reshape", "slice", "get")]
        assert source.count("launcher.launch(") == len(launches) == 1 + 6 * 2 + 1
        assert source.count("launcher.empty(") == len(graph.buffers)
        body = source[source.index("def step("):]
        assert not re.search(r"torch\.(?!float32|bfloat16|float16)\w+\(|F\.", body), "the program computes only in kernels"
    kinds = sorted({kind.KIND for kind, _ in program.kernels.values()})
    assert kinds == ["attention_decode", "attention_prefill", "gemm", "rows"]
    fused = [program.kernels[name][0].render(program.kernels[name][1]) for name in program.kernels if "silu_mul" in name]
    assert fused and all("b_sum_sq" in text and "acc1 = tl.dot(" in text for text in fused)  # rms_norm > linear > silu, mul


def test_the_kernel_table_gives_each_kernel_its_constexprs_and_launch_shape(helpers):
    graphs, _ = run_pipeline(trace(build_spec(helpers.TINY_LLAMA)))
    program = build_gpu_program(graphs, get_target("h100"))
    table = program.kernel_table()
    assert set(table) == set(program.kernels)
    for name, entry in table.items():
        kind, variant = program.kernels[name]
        assert entry["kind"] == kind.KIND and entry["constexprs"] == kind.constexprs(variant)
        assert (entry["num_warps"], entry["num_stages"]) == (variant.num_warps, variant.num_stages)
    # h100 has SMs to fill, so the decode phase brings the split-K variant and its reduce
    assert any(name.startswith("attention_reduce") for name in table)


def test_the_gpu_executors_warmup_batches_are_valid_steps(compile_tiny):
    """The warm-up that sizes the KV cache on a GPU (a prefill of every sequence, then a decode
    of each) follows the step convention: run through a program and the reference, on a cache of
    exactly the blocks it claims."""
    from kiln.ir.step import STEP_INPUTS
    from kiln.runtime.gpu_executor import warmup_batches

    model, lengths = compile_tiny(), [5, 20, 3]
    blocks_per_seq = -(-(max(lengths) + 1) // 16)
    batches = warmup_batches(lengths, 16, blocks_per_seq)
    assert [b.is_decode_only for b in batches] == [False, True] and batches[0].num_tokens == sum(lengths)
    slots = torch.cat([b.slot_mapping for b in batches])
    assert len(set(slots.tolist())) == len(slots) and int(slots.max()) < len(lengths) * blocks_per_seq * 16
    steps = [("decode" if b.is_decode_only else "mixed", {name: getattr(b, name) for name in STEP_INPUTS})
             for b in batches]
    for got, want in run_steps(model, steps, num_blocks=len(lengths) * blocks_per_seq)[0]:
        assert (got - want).abs().max() <= 2e-5 * want.abs().max()
