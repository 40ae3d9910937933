"""Every family kiln serves compiles for every GPU target: its lowered graphs (fused as the target
renders them) give the reference interpreter's logits when the generated program runs its Triton
kernels under the interpreter (the recurrent families through the state pool); each dense decoder
layer takes at most 7 launches, each MoE layer at most MOE_LAYER_LAUNCHES and each recurrent layer
at most LINEAR_LAYER_LAUNCHES; and the kernels of a Gemma 3 model cross-compile for every GPU
arch without spills."""

import pytest
import transformers

from kiln.codegen.gpu_program import build_gpu_program
from kiln.codegen.kernel_check import kernel_check
from kiln.codegen.targets import TARGETS, get_target
from kiln.frontend.tracer import StepConfig, trace
from kiln.ir.step import zero_states
from kiln.models import build_spec
from kiln.passes import PipelineOptions, run_pipeline

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)
FAMILIES = {  # what each exercises on the GPU path
    "gemma3": (transformers.Gemma3TextConfig, dict(  # embedding scale, q/k norms, 4 norms a layer, gelu gate
        head_dim=16, sliding_window=6, query_pre_attn_scalar=24, num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=32,
                                               attn_logit_softcapping=3.0, final_logit_softcapping=2.5)),
    "phi3-partial-longrope": (transformers.Phi3Config, dict(  # partial rotary; rope * attention factor
        partial_rotary_factor=0.5, original_max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "longrope", "short_factor": [1.0, 1.3, 2.0, 3.5],
                         "long_factor": [2.0, 3.0, 5.0, 9.0]})),
    "granite": (transformers.GraniteConfig, dict(embedding_multiplier=6.0, residual_multiplier=0.3,
                                                 attention_multiplier=0.09, logits_scaling=4.0)),
    "olmo2": (transformers.Olmo2Config, dict(attention_bias=True, rope_theta=5e4)),  # norms over the whole q, k
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32)),
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(  # softmax_top_k routing, renormalized; the moe kernels
        head_dim=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=True)),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(  # a shared expert: its gate's [T, 1] slice of the packed GEMM
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80)),
    "gpt_oss": (transformers.GptOssConfig, dict(  # sinks, windows, yarn, biases; top_k_softmax, clamped SwiGLU
        head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=6, swiglu_limit=1.0,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 64})),
    "qwen3_next": (transformers.Qwen3NextConfig, dict(  # gated_delta + causal_conv1d kernels, gated attention
        head_dim=16, num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        mlp_only_layers=[0, 1, 2], partial_rotary_factor=0.5)),
    "mamba2": (transformers.Mamba2Config, dict(  # the gated rule; a grouped gated norm; -exp(A_log) folded
        num_heads=8, head_dim=16, expand=2, state_size=16, n_groups=2)),
}
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss")
# A recurrent layer's launches: the projection GEMM (its input norm fused), the conv, the gates'
# row kernel(s), the recurrence, the output norm's row kernel (two: a grouped norm), the output
# GEMM (+ residual), and the MLP's two GEMMs where the layer has one: at most 10.
LINEAR_FAMILIES, LINEAR_LAYER_LAUNCHES = ("qwen3_next", "mamba2"), 10
# A MoE layer's kernel launches (the `moe` node is one graph node but launches MOE_KERNELS):
# attention as a dense layer's (7 less the MLP's two GEMMs: 5), the router GEMM (its input norm
# fused), softmax, top-k, the renormalization's sum and div in one row kernel (3), the moe kernels
# (align, gate_up, down, combine: 4), and the residual add after the experts (it cannot fuse into a
# kernel of the moe): 13; Qwen2-MoE's shared expert (its down GEMM, the gate's sigmoid product;
# no renormalization) takes it to 14.
MOE_KERNELS = 4
MOE_LAYER_LAUNCHES = 7 - 2 + 1 + 3 + MOE_KERNELS + 1 + 1
GPU_TARGETS = [name for name, target in TARGETS.items() if target.is_gpu]
# A whole model's kernels compile for each backend's oldest and newest architecture (the registry
# lists GPUs by backend, then architecture); tests/kernels cross-compile each kind for every one.
_BACKENDS = [None, *(TARGETS[name].backend for name in GPU_TARGETS), None]
EDGE_TARGETS = [TARGETS[name] for name, before, this, after in zip(GPU_TARGETS, _BACKENDS, _BACKENDS[1:], _BACKENDS[2:])
                if before != this or this != after]  # the first and the last of each backend


def hf_config(family: str) -> dict:
    config_class, extra = FAMILIES[family]
    config = config_class(**{**TINY, **extra}).to_dict()
    config["architectures"] = [config_class.__name__.replace("TextConfig", "ForCausalLM").replace("Config", "ForCausalLM")]
    return config


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_fuses_to_its_launch_bound_per_layer_and_renders_for_every_gpu_target(family):
    config = hf_config(family)
    graph = trace(build_spec(config))
    bound = MOE_LAYER_LAUNCHES if family in MOE_FAMILIES else LINEAR_LAYER_LAUNCHES if family in LINEAR_FAMILIES else 7
    for name in GPU_TARGETS:
        target = get_target(name)
        lowered, report = run_pipeline(graph, PipelineOptions(kernel_check=kernel_check(target)))
        for phase, lowered_graph in lowered.items():
            moe_nodes = sum(node.op == "moe" for node in lowered_graph.nodes)
            launches = report.launches_per_layer(phase)[1] + (MOE_KERNELS - 1) * moe_nodes / config["num_hidden_layers"]
            assert launches <= bound, (family, name, phase, report.summary())
        program = build_gpu_program(lowered, target)
        torch_ops = [line for source in program.sources.values() for line in source.splitlines() if "torch_value =" in line]
        # every launch is a kernel but the routers' top-k (no template yet: a torch op on the device)
        assert program.kernels and all(family in MOE_FAMILIES and "torch.topk(" in line for line in torch_ops), torch_ops


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_gpu_program_matches_the_reference_interpreter(compile_tiny, helpers, family):
    model = compile_tiny(hf_config(family))
    ours, theirs = zero_states(model.graphs["mixed"], 64), zero_states(model.graphs["mixed"], 64)
    # the chunked recurrence sums in another order than the reference's token-by-token one
    tolerance = 1e-4 if family in LINEAR_FAMILIES else 2e-5
    for step, (phase, inputs) in enumerate(helpers.step_inputs()):
        got, want = model.run(phase, inputs, ours), model.reference(phase, inputs, theirs)
        assert (got - want).abs().max() <= tolerance * want.abs().max(), f"{family}, step {step}"


def test_gemma3_kernels_cross_compile_for_every_gpu_arch_without_spills():
    from kiln.codegen.aot import cubin_arch

    spec = build_spec({**hf_config("gemma3"), "hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4,
                       "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 4096})  # Gemma-3-270M's layer
    graph = trace(spec, StepConfig(dtype="bf16"))  # what `kiln compile --target` builds by default
    for target in EDGE_TARGETS:
        lowered, _ = run_pipeline(graph, PipelineOptions(kernel_check=kernel_check(target)))
        compiled, _ = build_gpu_program(lowered, target).start_compile().result()
        for kernel in compiled:
            assert cubin_arch(kernel.binary) == target.arch_name and not kernel.resources.spills, (target.name, kernel.name)


def test_layers_share_their_kernels():
    """A model with more layers of the same shape needs no more kernels (cache keys hash the
    kernels' code, not the graph nodes they came from)."""
    counts = []
    for layers in (2, 5):
        graph = trace(build_spec({**hf_config("gemma3"), "num_hidden_layers": layers, "layer_types": None}))
        lowered, _ = run_pipeline(graph, PipelineOptions(kernel_check=kernel_check(get_target("h100"))))
        counts.append(len(build_gpu_program(lowered, get_target("h100")).kernels))
    assert counts[0] == counts[1]
