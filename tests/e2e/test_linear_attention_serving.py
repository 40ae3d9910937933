"""A hybrid of linear and full attention served by the engine: a tiny Qwen3-Next (Gated DeltaNet
layers around a gated full-attention layer, dense MLPs) compiled for the cpu target. Each of 16
requests, arriving one step apart so that prefill chunks and decodes of different requests share
steps, gets the tokens it gets alone, with and without preemption (a KV budget too small for all
of them), and those are transformers' greedy tokens. Prompts longer than the token budget are
prefilled in chunks: their recurrent state crosses steps through the state pool."""

import pytest
import torch
import transformers

from kiln.compiler import CompileOptions, compile_model
from kiln.frontend import load_checkpoint
from kiln.runtime.artifact import load_artifact
from kiln.runtime.engine import LLMEngine
from kiln.runtime.executor import CpuExecutor
from kiln.runtime.sampling_params import SamplingParams

NEW, REQUESTS, BUDGET = 12, 16, 96


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    """(transformers model, its compiled cpu artifact, 16 prompts of 3 to 199 tokens)."""
    torch.manual_seed(0)
    config = transformers.Qwen3NextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, head_dim=32, layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, mlp_only_layers=[0, 1, 2], max_position_embeddings=512, initializer_range=0.1,
        attn_implementation="eager")
    model = transformers.Qwen3NextForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-qwen3-next")
    model.save_pretrained(path)
    compile_model(str(path), path / "cpu", CompileOptions(target="cpu"), progress=False)
    g = torch.Generator().manual_seed(5)
    lengths = [*torch.randint(3, 40, (REQUESTS - 3,), generator=g).tolist(), 70, 130, 199]
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]
    return model, load_artifact(path / "cpu"), prompts


def _engine(artifact, kv_cache_memory: int = 8 << 20) -> LLMEngine:
    tokenizer = load_checkpoint("smollm2-135m", progress=False).tokenizer  # any: the engine detokenizes ids < 128
    executor = CpuExecutor(artifact, kv_cache_memory=kv_cache_memory, max_model_len=256)
    return LLMEngine(executor, tokenizer, eos_token_ids=[], max_num_batched_tokens=BUDGET)


def _serve(engine: LLMEngine, prompts, stagger: bool) -> list[list[int]]:
    """Greedy tokens per prompt; with `stagger`, request i arrives before step i, else all at once."""
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    pending, final = list(enumerate(prompts)), {}
    while pending or engine.has_unfinished_requests():
        for i, prompt in pending[: 1 if stagger else len(pending)]:
            engine.add_request(str(i), prompt, params)
        pending = pending[1:] if stagger else []
        for out in engine.step():
            if out.finished:
                final[out.request_id] = list(out.outputs[0].token_ids)
    return [final[str(i)] for i in range(len(prompts))]


def test_staggered_requests_with_and_without_preemption_get_the_tokens_each_gets_alone(qwen3_next, hf_greedy):
    model, artifact, prompts = qwen3_next
    engine = _engine(artifact)
    assert engine.kv.states is not None and engine.kv.states.num_slots >= REQUESTS
    batched = _serve(engine, prompts, stagger=True)
    assert engine.kv.states.num_free == engine.kv.states.num_slots  # every finished sequence returned its slot
    alone = [_serve(engine, [prompt], stagger=False)[0] for prompt in prompts]
    assert batched == alone
    tight = _engine(artifact, kv_cache_memory=512 << 10)  # 10 state slots, 24 KV blocks: too few for 10 sequences
    assert _serve(tight, prompts, stagger=False) == alone
    assert tight.scheduler.num_preemptions > 0
    for prompt, tokens in list(zip(prompts, alone))[-4:]:  # the long prompts were prefilled in chunks
        assert tokens == hf_greedy(model, prompt, NEW)
    assert len({tuple(t) for t in alone}) > REQUESTS // 2  # the prompts lead different ways


def test_an_aborted_request_frees_its_state_slot(qwen3_next):
    _, artifact, prompts = qwen3_next
    engine = _engine(artifact)
    engine.add_request("a", prompts[0], SamplingParams(max_tokens=NEW, temperature=0.0))
    engine.step()
    assert engine.kv.states.num_free == engine.kv.states.num_slots - 1
    engine.abort("a")
    assert engine.kv.states.num_free == engine.kv.states.num_slots
