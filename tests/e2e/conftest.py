"""Fixtures for end-to-end tests: a tiny random Llama checkpoint that uses SmolLM2's real
tokenizer and chat template (so text in and text out are realistic and compiles are fast)."""

import json

import pytest
import torch
import transformers

from kiln.frontend import load_checkpoint

# a 2-layer Qwen3-MoE (8 experts, top 2) small enough to run anywhere; tests add the vocabulary
TINY_QWEN3_MOE = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, max_position_embeddings=512, initializer_range=0.1)


@pytest.fixture(scope="session")
def save_tiny(tmp_path_factory):
    """`save_tiny(model, name)`: a transformers model saved in a fresh directory with SmolLM2's real
    tokenizer and chat template (its vocabulary must be SmolLM2's 49152); returns the directory."""
    smollm2 = load_checkpoint("smollm2-135m", progress=False)

    def save(model, name: str):
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        (path / "tokenizer.json").write_text(smollm2.tokenizer.to_str())
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": smollm2.chat_template}))
        return path

    return save


@pytest.fixture(scope="session")
def tiny_model_dir(save_tiny):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return save_tiny(transformers.LlamaForCausalLM(config).eval(), "tiny-llama")


@torch.inference_mode()
def _hf_greedy(model, ids: list[int], count: int) -> list[int]:
    """`count` greedy tokens from transformers with its KV cache, not stopping at EOS."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < count:
        out = model(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


@pytest.fixture(scope="session")
def hf_greedy():
    """`hf_greedy(model, ids, count)`: transformers' greedy continuation, the oracle of the e2e tests."""
    return _hf_greedy


def _serve_greedy(engine, prompts, stagger: bool, max_tokens: int) -> list[list[int]]:
    """`max_tokens` greedy tokens per prompt from an LLMEngine (ignoring EOS); with `stagger`,
    request i arrives before step i, else all at once."""
    from kiln.runtime.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    pending, final = list(enumerate(prompts)), {}
    while pending or engine.has_unfinished_requests():
        for i, prompt in pending[: 1 if stagger else len(pending)]:
            engine.add_request(str(i), prompt, params)
        pending = pending[1:] if stagger else []
        for out in engine.step():
            if out.finished:
                final[out.request_id] = list(out.outputs[0].token_ids)
    return [final[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="session")
def serve_greedy():
    """`serve_greedy(engine, prompts, stagger, max_tokens)`: each prompt's greedy tokens through the engine."""
    return _serve_greedy
