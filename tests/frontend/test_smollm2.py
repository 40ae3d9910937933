"""The real SmolLM2-135M-Instruct GGUF (built-in name `smollm2-135m`): config, chat template and
special tokens as documented; every tensor equal to what transformers loads from the same file;
the tokenizer encodes as transformers' GGUF tokenizer except that it splits digits individually,
as the original SmolLM2 tokenizer does (transformers' GGUF conversion forgets that split)."""

import pytest
import torch
import transformers

from kiln.frontend.checkpoint import load_checkpoint, save_hf_dir

pytestmark = pytest.mark.slow

TEXTS = ["Hello, world!", "The capital of France is Paris.", "  indented\n\tcode: x = y ** z;",
         "naïve café — déjà vu 🙂", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"]


@pytest.fixture(scope="module")
def smollm2():
    return load_checkpoint("smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def gguf_location(smollm2):
    return smollm2.path.parent, smollm2.path.name


def test_config_and_special_tokens(smollm2):
    config = smollm2.config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e5}
    assert config["rms_norm_eps"] == 1e-5 and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in smollm2.tensors
    assert smollm2.bos_token_id == 1 and smollm2.eos_token_ids == [2]
    assert smollm2.tokenizer.id_to_token(1) == "<|im_start|>" and smollm2.tokenizer.id_to_token(2) == "<|im_end|>"
    assert "<|im_start|>" in smollm2.chat_template and "add_generation_prompt" in smollm2.chat_template


@pytest.fixture(scope="module")
def transformers_state(gguf_location):
    """What transformers loads from the GGUF (~20 s, once): its state_dict."""
    directory, name = gguf_location
    return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).state_dict()


def test_tensors_equal_transformers_gguf_load(smollm2, transformers_state):
    expected = {k: v for k, v in transformers_state.items() if k != "lm_head.weight"}  # tied to the embedding
    assert set(smollm2.tensors) == set(expected)
    for tensor_name, tensor in expected.items():
        assert torch.equal(smollm2.tensors[tensor_name], tensor), tensor_name


def test_saved_hf_dir_loads_in_transformers(smollm2, transformers_state, tmp_path):
    save_hf_dir(smollm2, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
    for tensor_name, tensor in model.state_dict().items():
        assert torch.equal(tensor, transformers_state[tensor_name]), tensor_name
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + [" 42 and  2024 "]:
        assert tokenizer(text)["input_ids"] == smollm2.tokenizer.encode(text).ids, text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token_id == 2


def test_tokenizer(smollm2, gguf_location):
    directory, name = gguf_location
    theirs = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    ours = smollm2.tokenizer
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    # The original pre-tokenizer cuts digits out first, so " and  " is one piece whose trailing
    # blanks stay together ("ĠĠ"); without that cut, GPT-2's regex gives one blank to " 2024".
    encoding = ours.encode(" 42 and  2024 ")
    assert encoding.tokens == ["Ġ", "4", "2", "Ġand", "ĠĠ", "2", "0", "2", "4", "Ġ"]
    assert encoding.ids == [theirs.convert_tokens_to_ids(t) for t in encoding.tokens]
