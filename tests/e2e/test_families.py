"""Each Llama-family member: kiln's traced step graph (run by the reference interpreter over a
paged KV cache) gives the logits transformers gives, for a prefill, decode steps, and one step
that mixes a chunked prefill, decodes and a fresh prompt."""

import pytest
import torch
import transformers

from kiln.codegen.cpu import lay_out_weights, render_cpu_program
from kiln.codegen.cpu_step_kernels import build_step_library
from kiln.codegen.render import load_kernel_module
from kiln.frontend import load_checkpoint, trace
from kiln.frontend.weights import load_weights
from kiln.ir import interpret, verify
from kiln.ir.step import PagedSequences, zero_states
from kiln.models import build_spec
from kiln.passes import PipelineOptions, materialize_weights, run_pipeline
from kiln.runtime import cpu_step_kernels

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            initializer_range=0.2)  # weights large enough that attention (and so rope) moves the logits
PHI3_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                                 rope_theta=50000.0)),
    "smollm2": (transformers.LlamaConfig, dict(tie_word_embeddings=True, rope_theta=100000.0, num_key_value_heads=1)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=7, head_dim=16)),
    "gemma3": (transformers.Gemma3TextConfig, dict(  # QK-norm already makes attention sharp
        initializer_range=0.02, head_dim=16, sliding_window=6, query_pre_attn_scalar=24, num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=32,
                                               attn_logit_softcapping=3.0, final_logit_softcapping=2.5,
                                               initializer_range=0.3)),  # scores and logits reach the caps
    "phi3": (transformers.Phi3Config, dict(sliding_window=9, **PHI3_TOKENS)),
    "phi3-partial": (transformers.Phi3Config, dict(partial_rotary_factor=0.5, **PHI3_TOKENS)),
    "phi3-longrope": (transformers.Phi3Config, dict(  # attention factor sqrt(1 + ln 4 / ln 64)
        original_max_position_embeddings=64, **PHI3_TOKENS,
        rope_parameters={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 3.5, 5.0],
                         "long_factor": [2.0, 2.5, 3.0, 4.0, 5.0, 7.0, 9.0, 12.0]})),
    "phi3-partial-longrope": (transformers.Phi3Config, dict(  # the factor scales only the rotated dims
        partial_rotary_factor=0.5, original_max_position_embeddings=64, **PHI3_TOKENS,
        rope_parameters={"rope_type": "longrope", "short_factor": [1.0, 1.3, 2.0, 3.5],
                         "long_factor": [2.0, 3.0, 5.0, 9.0]})),
    "granite": (transformers.GraniteConfig, dict(embedding_multiplier=6.0, residual_multiplier=0.3,
                                                 attention_multiplier=0.09, logits_scaling=4.0)),
    "olmo2": (transformers.Olmo2Config, dict(attention_bias=True, eos_token_id=2, rope_theta=5e4)),
    # mixtures of experts: 8 experts, 2 or 3 per token; a dense MLP in some layers
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(head_dim=16, num_experts=8, num_experts_per_tok=3,
                                                    moe_intermediate_size=48, norm_topk_prob=True, num_hidden_layers=3,
                                                    mlp_only_layers=[1])),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                                    shared_expert_intermediate_size=80, decoder_sparse_step=2)),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=None)),
    # sinks, alternating windows, YaRN without truncation; swiglu_limit 1 clamps about half the gate/up values
    "gpt_oss": (transformers.GptOssConfig, dict(
        head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=6, swiglu_limit=1.0,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 64})),
    # a hybrid: Gated DeltaNet layers (2 key heads serving 4 value heads) around a gated full attention layer
    "qwen3_next": (transformers.Qwen3NextConfig, dict(
        head_dim=16, num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
        linear_conv_kernel_dim=4, mlp_only_layers=[0, 1, 2], partial_rotary_factor=0.5)),
    # no attention: SSD mixers (8 heads in 2 groups), the "gated" recurrence
    "mamba2": (transformers.Mamba2Config, dict(
        num_heads=8, head_dim=16, expand=2, state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
        initializer_range=0.1, residual_in_fp32=False)),
}
# the attention windows each family's graph has (default: {None})
WINDOWS = {"mistral": {7}, "gemma3": {6, None}, "gemma2": {5, None}, "phi3": {9}, "gpt_oss": {6, None}, "mamba2": set()}


def hf_model(family: str, **overrides):
    config_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(**{**TINY, **extra, **overrides}, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.config.architectures = [type(model).__name__]
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@torch.no_grad()
def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: logits at every position of one full forward (no cache)."""
    return model(torch.tensor([tokens])).logits[0]


class KilnRunner:
    """Runs a model step by step: the traced graph through the reference interpreter, or the
    compiled model (pass pipeline -> `cpu` target's generated programs, one per phase, on the C
    step kernels)."""

    def __init__(self, checkpoint_dir, engine: str, family: str):
        ckpt = load_checkpoint(str(checkpoint_dir), progress=False)
        config = ckpt.config
        self.spec = build_spec(config)
        self.graph = trace(self.spec)
        verify(self.graph)
        self.weights = load_weights(self.spec, self.spec.WEIGHTS, ckpt.tensors, torch.float32, progress=False)
        self.pages = PagedSequences(num_blocks=64, block_size=16)
        self.states = zero_states(self.graph, 64)
        if engine == "interpreter":
            self.run = lambda inputs, phase: interpret(self.graph, inputs, self.weights, self.states)
        else:
            phases, _ = run_pipeline(self.graph, PipelineOptions(verify=True))
            programs = {p: load_kernel_module(render_cpu_program(g), f"test_{family}_{p}") for p, g in phases.items()}
            weights = {k: w for g in phases.values() for k, w in materialize_weights(g, self.weights).items()}
            packed = lay_out_weights(phases.values(), weights)
            self.run = lambda inputs, phase: programs[phase].step(inputs, packed, self.states)

    def step(self, chunks):
        phase = "decode" if all(len(tokens) == 1 for _, tokens in chunks) else "mixed"
        return self.run(self.pages.step(chunks), phase)["logits"]


@pytest.fixture(scope="module")
def step_kernels(tmp_path_factory):
    """The cpu target's C step kernels (the executor installs them): the compiled-cpu engine runs on them."""
    directory = tmp_path_factory.mktemp("step-kernels")
    return cpu_step_kernels.load_step_library(directory, build_step_library(directory))


@pytest.fixture
def engine_kernels(engine, step_kernels):
    cpu_step_kernels.install(step_kernels if engine == "compiled-cpu" else None)
    yield
    cpu_step_kernels.install(None)


@pytest.mark.parametrize("engine", ["interpreter", "compiled-cpu"])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.usefixtures("engine_kernels")
def test_prefill_decode_and_mixed_step_match_transformers(family, engine, tmp_path):
    model = hf_model(family)
    model.save_pretrained(tmp_path)
    kiln = KilnRunner(tmp_path, engine, family)
    windows = {n.attrs["spec"].window for n in kiln.graph.nodes if n.op == "attention"}
    assert windows == WINDOWS.get(family, {None})
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 128, (21,), generator=g).tolist()  # prefilled, then decodes
    b = torch.randint(0, 128, (30,), generator=g).tolist()  # prefilled in two chunks
    c = torch.randint(0, 128, (5,), generator=g).tolist()  # arrives in the mixed step
    ref_a, ref_b, ref_c = hf_logits(model, a), hf_logits(model, b), hf_logits(model, c)
    worst = 0.0

    def check(got, want):
        nonlocal worst
        worst = max(worst, (got - want).abs().max().item())
        assert torch.allclose(got, want, atol=1e-4, rtol=0), f"{family}: max abs diff {(got - want).abs().max():.2e}"

    # step 1: prefill a and the first chunk of b
    logits = kiln.step([("a", a[:18]), ("b", b[:11])])
    check(logits[0], ref_a[17])
    check(logits[1], ref_b[10])
    # steps 2-3: decodes of a only
    for i in (18, 19):
        check(kiln.step([("a", [a[i]])])[0], ref_a[i])
    # step 4, mixed: a decodes, b prefills its remaining chunk (mid-context), c prefills fresh
    logits = kiln.step([("a", [a[20]]), ("b", b[11:]), ("c", c)])
    check(logits[0], ref_a[20])
    check(logits[1], ref_b[29])
    check(logits[2], ref_c[4])
    print(f"{family} ({engine}): max abs logit diff vs transformers {worst:.2e}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_equal_transformers_generate(family, tmp_path):
    """32 new tokens, kiln's compiled cpu program stepping on its own argmax (a prefill, then
    decodes over the paged KV cache, past every sliding window) = transformers' greedy generate."""
    # weights large enough that the text does not repeat one token (Gemma's scaled embeddings saturate sooner)
    model = hf_model(family, initializer_range=0.02 if family.startswith("gemma") else 0.3)
    model.save_pretrained(tmp_path)
    model.generation_config.eos_token_id = None  # a random model may pick its EOS: keep going
    kiln = KilnRunner(tmp_path, "compiled-cpu", family)
    prompt = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                              pad_token_id=0)[0, len(prompt):].tolist()
    got, logits = [], kiln.step([("s", prompt)])[0]
    for _ in range(32):
        got.append(int(logits.argmax()))
        logits = kiln.step([("s", got[-1:])])[0]
    assert got == want, f"{family}: kiln {got} vs transformers {want}"
    print(f"{family}: 32 greedy tokens equal, {len(set(got))} distinct")
