"""Cache groups end to end: a tiny Gemma 3 (window 8; 2 full + 4 sliding layers, so one full and
two sliding-window groups) compiled for the cpu target and served by the engine gives
transformers' greedy tokens for a 200-token prompt and 100 new tokens, while the blocks each
sequence holds stay bounded by the window; the same with preemption under a tiny KV budget, and
with a prefix-cache hit."""

import pytest
import torch
import transformers

from kiln.compiler import CompileOptions, compile_model
from kiln.errors import KilnError
from kiln.frontend import load_checkpoint
from kiln.runtime import kv_groups
from kiln.runtime.artifact import load_artifact
from kiln.runtime.engine import LLMEngine
from kiln.runtime.executor import CpuExecutor
from kiln.runtime.sampling_params import SamplingParams

WINDOW, PROMPT, NEW, BS = 8, 200, 100, 16
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter
LAYERS = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(transformers model, its compiled cpu artifact, two random prompts)."""
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=WINDOW, layer_types=LAYERS,
        query_pre_attn_scalar=24, initializer_range=0.02, attn_implementation="eager")
    model = transformers.Gemma3ForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-gemma3-window")
    model.save_pretrained(path)
    compile_model(str(path), path / "cpu", CompileOptions(target="cpu"), progress=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (PROMPT,), generator=g).tolist() for _ in range(2)]
    return model, load_artifact(path / "cpu"), prompts


@pytest.fixture(scope="module")
def tokenizer():
    return load_checkpoint("smollm2-135m", progress=False).tokenizer  # any: the engine detokenizes ids < 128


@pytest.fixture(scope="module")
def want(gemma, hf_greedy):
    model, _, prompts = gemma
    return [hf_greedy(model, prompt, NEW) for prompt in prompts]


def _engine(artifact, tokenizer, num_blocks: int) -> LLMEngine:
    groups = kv_groups.manifest_groups(artifact.manifest)
    executor = CpuExecutor(artifact, kv_cache_memory=num_blocks * kv_groups.block_bytes(groups), max_model_len=512)
    assert executor.num_blocks == num_blocks
    return LLMEngine(executor, tokenizer, eos_token_ids=[], max_num_batched_tokens=64)


def _run(engine: LLMEngine, prompts, on_step=lambda engine: None, count: int = NEW) -> list[list[int]]:
    params = SamplingParams(max_tokens=count, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
        on_step(engine)
    return [list(final[str(i)]) for i in range(len(prompts))]


def test_the_manifest_lists_a_full_group_and_two_window_groups(gemma):
    groups = kv_groups.manifest_groups(gemma[1].manifest)
    assert [(g.kind, g.layers, g.window) for g in groups] == [
        ("full", (2, 5), None), ("sliding_window", (0, 1), WINDOW), ("sliding_window", (3, 4), WINDOW)]
    # the last decode of a 512-token context: 32 blocks in the full group; its window, 504..511, is block 31
    assert [g["blocks_per_sequence"] for g in gemma[1].manifest["cache_groups"]] == [32, 1, 1]


def test_greedy_tokens_equal_transformers_while_window_blocks_stay_bounded(gemma, want, tokenizer):
    _, artifact, prompts = gemma
    engine = _engine(artifact, tokenizer, num_blocks=200)
    worst = {}

    def check_held(engine):
        for seq in engine.scheduler.running:
            if seq.num_computed_tokens >= PROMPT:  # decoding: the window groups hold at most 2 blocks each
                full = -(-seq.num_computed_tokens // BS)
                worst[seq.seq_id] = max(worst.get(seq.seq_id, 0), engine.kv.num_held_blocks(seq.seq_id) - full)

    got = _run(engine, prompts[:1], check_held)
    assert got == want[:1]
    assert 0 < max(worst.values()) <= 2 * 2
    assert engine.kv.num_used_blocks == 0


def test_preemption_under_a_tiny_kv_budget_keeps_the_tokens(gemma, want, tokenizer):
    _, artifact, prompts = gemma
    engine = _engine(artifact, tokenizer, num_blocks=34)  # one sequence needs up to 19 + 2 * 6
    assert _run(engine, prompts) == want
    assert engine.scheduler.num_preemptions > 0


def test_the_interpreted_gpu_executor_serves_the_groups_from_shared_slot_tensors(gemma, tokenizer, hf_greedy, tmp_path):
    """The b200 program's kernels (interpreted) over one pool whose slot tensors the groups share,
    decode steps through the CUDA-graph static buffers (not captured here)."""
    from kiln.runtime.gpu_executor import GpuExecutor

    model, artifact, prompts = gemma
    compile_model(str(artifact.path.parent), tmp_path / "b200", CompileOptions(target="b200"), progress=False)
    executor = GpuExecutor(load_artifact(tmp_path / "b200"), interpret=True, kv_cache_memory=1 << 20, max_model_len=512,
                           max_num_batched_tokens=32, max_num_seqs=2, enforce_eager=False)
    assert executor.states["k_cache.0"] is executor.states["k_cache.2"] is executor.states["k_cache.3"]
    engine = LLMEngine(executor, tokenizer, eos_token_ids=[], max_num_batched_tokens=32)
    assert _run(engine, [prompts[0][:40]], count=12) == [hf_greedy(model, prompts[0][:40], 12)]
    assert executor.graphs.replays > 0


def test_a_prefix_cache_hit_keeps_the_tokens(gemma, want, tokenizer):
    _, artifact, prompts = gemma
    engine = _engine(artifact, tokenizer, num_blocks=200)
    assert _run(engine, prompts[:1]) == want[:1]
    assert engine.kv.prefix_hit_tokens == 0
    assert _run(engine, prompts[:1]) == want[:1]  # the same prompt again: served from the cache
    assert engine.kv.prefix_hit_tokens == PROMPT // BS * BS


def test_a_request_longer_than_the_pool_holds_is_refused_naming_the_limit(gemma, tokenizer):
    engine = _engine(gemma[1], tokenizer, num_blocks=34)
    # 384 tokens: 24 full blocks + 2 window groups x 5 blocks (the last 64-token chunk, 320..383, reads
    # from position 313, block 19); 385 would need a 25th full block
    holds = engine.kv_capacity_tokens
    assert holds == 24 * BS
    with pytest.raises(KilnError, match=f"exceeds the {holds} tokens the KV cache holds"):
        engine.add_request("long", gemma[2][0], SamplingParams(max_tokens=holds - PROMPT + 1))
    engine.add_request("fits", gemma[2][0], SamplingParams(max_tokens=holds - PROMPT))
