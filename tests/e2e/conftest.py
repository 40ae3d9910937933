"""Fixtures for end-to-end tests: a tiny random Llama checkpoint that uses SmolLM2's real
tokenizer and chat template (so text in and text out are realistic and compiles are fast)."""

import json

import pytest
import torch
import transformers

from kiln.frontend import load_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    smollm2 = load_checkpoint("smollm2-135m", progress=False)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(smollm2.tokenizer.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": smollm2.chat_template}))
    return path
