"""A mixture of experts served by the engine: a tiny Qwen3-MoE compiled for the cpu target gives
each of 16 requests, arriving one step apart so that prefills and decodes of different requests
share steps, the tokens it gives alone (routing is per token: a batch changes no token's experts),
and those are transformers' greedy tokens."""

import pytest
import torch
import transformers

from kiln.compiler import CompileOptions, compile_model
from kiln.frontend import load_checkpoint
from kiln.runtime.artifact import load_artifact
from kiln.runtime.engine import LLMEngine
from kiln.runtime.executor import CpuExecutor

from .conftest import TINY_QWEN3_MOE

NEW, REQUESTS = 12, 16


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    """(transformers model, its compiled cpu artifact, 16 prompts of different lengths)."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=128, attn_implementation="eager", **TINY_QWEN3_MOE)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    model.save_pretrained(path)
    compile_model(str(path), path / "cpu", CompileOptions(target="cpu"), progress=False)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (REQUESTS,), generator=g)]
    return model, load_artifact(path / "cpu"), prompts


def _engine(artifact) -> LLMEngine:
    tokenizer = load_checkpoint("smollm2-135m", progress=False).tokenizer  # any: the engine detokenizes ids < 128
    executor = CpuExecutor(artifact, kv_cache_memory=8 << 20, max_model_len=512)
    return LLMEngine(executor, tokenizer, eos_token_ids=[], max_num_batched_tokens=96)


def test_sixteen_staggered_requests_get_the_tokens_each_gets_alone(qwen3_moe, hf_greedy, serve_greedy):
    model, artifact, prompts = qwen3_moe
    engine = _engine(artifact)
    batched = serve_greedy(engine, prompts, True, NEW)
    alone = [serve_greedy(engine, [prompt], False, NEW)[0] for prompt in prompts]
    assert batched == alone
    for prompt, tokens in list(zip(prompts, alone))[:4]:
        assert tokens == hf_greedy(model, prompt, NEW)
    assert len({tuple(t) for t in alone}) > REQUESTS // 2  # the prompts lead different ways
