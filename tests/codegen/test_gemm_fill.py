"""Decode GEMMs fill the GPU: for SmolLM2-135M and Llama-3-8B shapes (one layer: the layers are
alike), every GEMM kernel of the decode program that the compiler builds for h100, h200 and b200
launches at least one program per SM at batch 1 (BLOCK_N shrunk, then serial split-K: see
gemm.choose). Read from the launch plan (the program's kernels and gemm.grid); no GPU needed."""

import pytest

from kiln.codegen.gpu_program import build_gpu_program
from kiln.codegen.kernel_check import kernel_check
from kiln.codegen.kernels import gemm
from kiln.codegen.targets import get_target
from kiln.frontend.tracer import StepConfig, trace
from kiln.models import build_spec
from kiln.passes import PipelineOptions, run_pipeline

SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
LLAMA_3_8B = dict(SMOLLM2_135M, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, rope_theta=500000.0, tie_word_embeddings=False)
MODELS = {"smollm2-135m": SMOLLM2_135M, "llama-3-8b": LLAMA_3_8B}


def linears(config: dict) -> set[tuple[int, int, int]]:
    """(N, K, slices) of the layer's GEMMs: qkv, o_proj, gate_up (2 slices), down, lm_head."""
    hidden, heads, kv, dim = (config[key] for key in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                      "head_dim"))
    return {((heads + 2 * kv) * dim, hidden, 1), (hidden, heads * dim, 1), (config["intermediate_size"], hidden, 2),
            (hidden, config["intermediate_size"], 1), (config["vocab_size"], hidden, 1)}


@pytest.fixture(scope="module")
def decode_graphs():
    """model -> its lowered decode graph (bf16, as `kiln compile --target` builds), per target."""
    graphs = {}
    for model, config in MODELS.items():
        traced = trace(build_spec(config), StepConfig(dtype="bf16"))
        for name in ("h100", "h200", "b200"):
            lowered, _ = run_pipeline(traced, PipelineOptions(kernel_check=kernel_check(get_target(name))))
            graphs[model, name] = lowered["decode"]
    return graphs


@pytest.mark.parametrize("target_name", ["h100", "h200", "b200"])
@pytest.mark.parametrize("model", list(MODELS))
def test_every_decode_gemm_fills_the_gpu_at_batch_1(decode_graphs, model, target_name):
    target = get_target(target_name)
    program = build_gpu_program({"decode": decode_graphs[model, target_name]}, target)
    decode_m = target.tiles(gemm.KIND, gemm.bucket(1)).block("BLOCK_M")
    variants = [variant for kind, variant in program.kernels.values() if kind is gemm and variant.block_m == decode_m]
    assert {(v.n, v.k, v.epilogue.slices) for v in variants} == linears(MODELS[model])
    for variant in variants:
        programs = gemm.grid(variant, 1)[0]
        assert programs >= target.sm_count, (variant.cache_key, programs)
        assert gemm.workspace_values(variant, 1) == (variant.split_k * variant.epilogue.slices * variant.n
                                                     if variant.split_k > 1 else 0)
    assert any(v.split_k > 1 for v in variants)  # these shapes need split-K, not only narrower tiles
