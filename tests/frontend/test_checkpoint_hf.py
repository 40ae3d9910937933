"""HF directories: tensors equal transformers' state_dict (single file and sharded, stored dtype
kept), config and special tokens read from every file that holds them, the lazy tensor mapping,
and save_hf_dir round-tripping through transformers."""

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from kiln.frontend.checkpoint import load_checkpoint, save_hf_dir
from kiln.frontend.checkpoint_types import LazyTensors

CONFIG_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "vocab_size",
                 "tie_word_embeddings", "max_position_embeddings", "architectures"]


@pytest.mark.parametrize("shard_size, dtype", [(None, torch.float32), ("40KB", torch.bfloat16)])
def test_tensors_equal_transformers_state_dict(tmp_path, tiny, shard_size, dtype):
    model = tiny("llama", rope_theta=5e5).to(dtype)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_size is not None)

    ckpt = load_checkpoint(str(tmp_path), progress=False)

    expected = model.state_dict()
    assert set(ckpt.tensors) == set(expected)
    for name, tensor in expected.items():
        assert ckpt.tensors[name].dtype == dtype, name
        assert torch.equal(ckpt.tensors[name], tensor), name
    reloaded = transformers.LlamaConfig(**ckpt.config)
    for field in CONFIG_FIELDS:
        assert getattr(reloaded, field) == getattr(model.config, field), field
    assert ckpt.path == tmp_path.resolve() and ckpt.source == str(tmp_path)


@pytest.fixture
def model_dir(tmp_path, tiny, bpe_vocab):
    """A tiny Llama directory with a tokenizer.json (bos/eos ids 1/2 in config.json)."""
    tiny("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "model")
    tokens, merges = bpe_vocab
    tokenizer = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(tokens[:3])
    tokenizer.save(str(tmp_path / "model" / "tokenizer.json"))
    (tmp_path / "model" / "generation_config.json").unlink(missing_ok=True)
    return tmp_path / "model"


def _write_json(path, content):
    path.write_text(json.dumps(content))


def test_special_tokens_come_from_generation_config_then_config_then_tokenizer_config(model_dir):
    _write_json(model_dir / "tokenizer_config.json",
                {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>"})
    ckpt = load_checkpoint(str(model_dir), progress=False)
    assert ckpt.generation_config == {}
    assert ckpt.bos_token_id == 1 and ckpt.eos_token_ids == [2, 0]  # config.json's, then tokenizer_config's

    _write_json(model_dir / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [1, 2]})
    ckpt = load_checkpoint(str(model_dir), progress=False)
    assert ckpt.generation_config == {"bos_token_id": 0, "eos_token_id": [1, 2]}
    assert ckpt.bos_token_id == 0 and ckpt.eos_token_ids == [1, 2, 0]


def test_chat_template_from_jinja_file_or_tokenizer_config(model_dir):
    _write_json(model_dir / "tokenizer_config.json", {"chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]})
    assert load_checkpoint(str(model_dir), progress=False).chat_template == "DEFAULT"
    _write_json(model_dir / "tokenizer_config.json", {"chat_template": "FROM CONFIG"})
    assert load_checkpoint(str(model_dir), progress=False).chat_template == "FROM CONFIG"
    (model_dir / "chat_template.jinja").write_text("FROM JINJA FILE")
    assert load_checkpoint(str(model_dir), progress=False).chat_template == "FROM JINJA FILE"


def test_save_hf_dir_round_trips_through_transformers(model_dir, tmp_path):
    _write_json(model_dir / "tokenizer_config.json", {"chat_template": "{{ messages[0]['content'] }}!",
                                                      "eos_token": "<|im_end|>"})
    ckpt = load_checkpoint(str(model_dir), progress=False)
    save_hf_dir(ckpt, tmp_path / "saved")

    original = transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    assert set(saved) == set(original)
    for name, tensor in original.items():
        assert torch.equal(saved[name], tensor), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    text = "the 123 and<|im_end|> hé"
    assert tokenizer(text)["input_ids"] == ckpt.tokenizer.encode(text).ids
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi!"
    assert tokenizer.eos_token_id == 2
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "saved")
    assert generation.bos_token_id == 1 and generation.eos_token_id == 2


def test_lazy_tensors_read_on_lookup_only_and_show_progress(capsys):
    reads = []

    def loader(name):
        return lambda: reads.append(name) or torch.full((2,), float(len(reads)))

    tensors = LazyTensors({n: loader(n) for n in ("a", "b")}, description="reading test", progress=True)
    assert len(tensors) == 2 and list(tensors) == ["a", "b"] and "a" in tensors and "c" not in tensors
    assert reads == []
    assert torch.equal(tensors["a"], torch.full((2,), 1.0))
    assert torch.equal(tensors["a"], torch.full((2,), 2.0))  # not cached: read again
    assert reads == ["a", "a"]
    tensors["b"]
    assert "reading test" in capsys.readouterr().err

    silent = LazyTensors({"a": loader("a")}, description="reading quietly", progress=False)
    silent["a"]
    assert "reading quietly" not in capsys.readouterr().err
