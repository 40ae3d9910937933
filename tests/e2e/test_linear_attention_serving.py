"""Recurrent models served by the engine, compiled for the cpu target: a tiny Qwen3-Next (Gated
DeltaNet layers around a gated full-attention layer, dense MLPs) and a tiny Mamba2 (no attention
at all: no KV cache, only the state pool). Each of 16 requests, arriving one step apart so that
prefill chunks and decodes of different requests share steps, gets the tokens it gets alone (for
the hybrid also with preemption: a KV budget too small for all of them), and those are
transformers' greedy tokens. Prompts longer than the token budget are prefilled in chunks: their
recurrent state crosses steps through the state pool."""

import pytest
import torch
import transformers

from kiln.compiler import CompileOptions, compile_model
from kiln.errors import KilnError
from kiln.frontend import load_checkpoint
from kiln.runtime.artifact import load_artifact
from kiln.runtime.engine import LLMEngine
from kiln.runtime.executor import CpuExecutor
from kiln.runtime.sampling_params import SamplingParams

NEW, REQUESTS, BUDGET = 12, 16, 96


def _compiled(config, path):
    """(transformers model of `config` (random, seed 0), its compiled cpu artifact, 16 prompts of 3 to 199 tokens)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    compile_model(str(path), path / "cpu", CompileOptions(target="cpu"), progress=False)
    g = torch.Generator().manual_seed(5)
    lengths = [*torch.randint(3, 40, (REQUESTS - 3,), generator=g).tolist(), 70, 130, 199]
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]
    return model, load_artifact(path / "cpu"), prompts


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    config = transformers.Qwen3NextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, head_dim=32, layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, mlp_only_layers=[0, 1, 2], max_position_embeddings=512, initializer_range=0.1,
        attn_implementation="eager")
    return _compiled(config, tmp_path_factory.mktemp("tiny-qwen3-next"))


@pytest.fixture(scope="module")
def mamba2(tmp_path_factory):
    config = transformers.Mamba2Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, expand=2, state_size=16,
        n_groups=2, conv_kernel=4, chunk_size=32, residual_in_fp32=False)
    return _compiled(config, tmp_path_factory.mktemp("tiny-mamba2"))


def _engine(artifact, kv_cache_memory: int = 8 << 20, **options) -> LLMEngine:
    tokenizer = load_checkpoint("smollm2-135m", progress=False).tokenizer  # any: the engine detokenizes ids < 128
    executor = CpuExecutor(artifact, kv_cache_memory=kv_cache_memory, max_model_len=256)
    return LLMEngine(executor, tokenizer, eos_token_ids=[], max_num_batched_tokens=BUDGET, **options)


def test_staggered_requests_with_and_without_preemption_get_the_tokens_each_gets_alone(qwen3_next, hf_greedy, serve_greedy):
    model, artifact, prompts = qwen3_next
    engine = _engine(artifact)
    assert engine.kv.states is not None and engine.kv.states.num_slots >= REQUESTS
    batched = serve_greedy(engine, prompts, True, NEW)
    assert engine.kv.states.num_free == engine.kv.states.num_slots  # every finished sequence returned its slot
    alone = [serve_greedy(engine, [prompt], False, NEW)[0] for prompt in prompts]
    assert batched == alone
    tight = _engine(artifact, kv_cache_memory=512 << 10)  # 10 state slots, 24 KV blocks: too few for 10 sequences
    assert serve_greedy(tight, prompts, False, NEW) == alone
    assert tight.scheduler.num_preemptions > 0
    for prompt, tokens in list(zip(prompts, alone))[-4:]:  # the long prompts were prefilled in chunks
        assert tokens == hf_greedy(model, prompt, NEW)
    assert len({tuple(t) for t in alone}) > REQUESTS // 2  # the prompts lead different ways


def test_a_model_without_attention_serves_from_the_state_pool_alone(mamba2, hf_greedy, serve_greedy):
    model, artifact, prompts = mamba2
    engine = _engine(artifact)
    assert engine.executor.cache_groups == [] and engine.executor.num_blocks == 0
    batched = serve_greedy(engine, prompts, True, NEW)
    alone = [serve_greedy(engine, [prompt], False, NEW)[0] for prompt in prompts]
    assert batched == alone
    for prompt, tokens in list(zip(prompts, alone))[-3:]:
        assert tokens == hf_greedy(model, prompt, NEW)


@pytest.mark.parametrize("model", ["qwen3_next", "mamba2"])
def test_a_prefix_hit_restores_the_state_snapshot_at_the_last_interval(model, request, serve_greedy):
    """Snapshots every 32 tokens: prompts sharing the first 100 tokens of a served one compute only
    what follows its snapshot at 96, and get the tokens they get without prefix caching."""
    _, artifact, prompts = request.getfixturevalue(model)
    leader, shared = prompts[-1], prompts[-1][:100]
    followers = [shared + prompt[:extra] for extra, prompt in ((5, prompts[0]), (20, prompts[1]), (1, prompts[2]))]
    cold = _engine(artifact, enable_prefix_caching=False)
    want = [serve_greedy(cold, [prompt], False, NEW)[0] for prompt in followers]
    assert cold.kv.snapshots is None and cold.kv.prefix_hit_tokens == 0
    warm = _engine(artifact, state_snapshot_interval=32)
    serve_greedy(warm, [leader], False, NEW)  # snapshots at 32, 64, ..., 192 (its chunks end there)
    assert len(warm.kv.snapshots) == len(leader) // 32
    for prompt, tokens in zip(followers, want):
        computed, hits = warm.scheduler.prompt_tokens_computed, warm.kv.prefix_hit_tokens
        assert serve_greedy(warm, [prompt], False, NEW)[0] == tokens
        assert warm.kv.prefix_hit_tokens - hits == 96
        assert warm.scheduler.prompt_tokens_computed - computed == len(prompt) - 96  # 4 of the shared 100 tokens


def test_a_snapshot_interval_off_the_block_size_is_refused(qwen3_next):
    with pytest.raises(KilnError, match="snapshot interval 40 is not a multiple of the block size 16"):
        _engine(qwen3_next[1], state_snapshot_interval=40)


def test_an_aborted_request_frees_its_state_slot(qwen3_next):
    _, artifact, prompts = qwen3_next
    engine = _engine(artifact)
    engine.add_request("a", prompts[0], SamplingParams(max_tokens=NEW, temperature=0.0))
    engine.step()
    assert engine.kv.states.num_free == engine.kv.states.num_slots - 1
    engine.abort("a")
    assert engine.kv.states.num_free == engine.kv.states.num_slots
