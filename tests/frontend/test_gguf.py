"""GGUF files written in the test the way llama.cpp writes them (tiny llama / qwen2 / qwen3 models,
Q8_0 matrices, a byte-level BPE vocabulary): kiln's tensors equal the original model's (after the
same quantization) and what transformers loads from the same file; the synthesized config rebuilds
the original HF config; the tokenizer encodes as transformers' GGUF tokenizer does."""

import gguf
import pytest
import torch
import transformers

from kiln.errors import KilnError
from kiln.frontend.checkpoint import load_checkpoint
from kiln.frontend.weights import load_weights
from kiln.models import build_spec

ARCHS = {  # transformers reads no head_dim from qwen3 GGUF files, so qwen3 uses its default (128)
    "llama": dict(tie_word_embeddings=True),
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(head_dim=128, tie_word_embeddings=False),
}
CONFIG_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "rope_parameters", "vocab_size",
                 "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id"]
TEXTS = ["the and  the", "hé\n\n  the<|im_start|>and<|im_end|><think>x", "Ġ<|endoftext|>the"]
DIGIT_TEXTS = ["the 123 and  4567 ", " 12345 1 12"]


@pytest.mark.parametrize("arch", ARCHS)
def test_tensors_and_config_match_the_original_and_transformers(tmp_path, tiny, gguf_writer, q8, arch):
    model = tiny(arch, **ARCHS[arch])
    path = gguf_writer(tmp_path / f"{arch}.gguf", model)

    ckpt = load_checkpoint(str(path), progress=False)

    original = model.state_dict()
    if model.config.tie_word_embeddings:
        del original["lm_head.weight"]
    from_transformers = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
    assert set(ckpt.tensors) == set(original)
    for name, tensor in original.items():
        loaded = ckpt.tensors[name]
        assert loaded.dtype == torch.float32, name
        assert torch.equal(loaded, q8(tensor) if tensor.ndim == 2 else tensor), name
        assert torch.equal(loaded, from_transformers[name]), name
    rebuilt = type(model.config)(**ckpt.config)
    for field in CONFIG_FIELDS:
        assert getattr(rebuilt, field) == getattr(model.config, field), field
    assert ckpt.config["architectures"] == [type(model).__name__]
    default_head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert ckpt.config["head_dim"] == ARCHS[arch].get("head_dim", default_head_dim)
    assert "attention_bias" not in ckpt.config if arch == "qwen2" else ckpt.config["attention_bias"] is False
    assert ckpt.bos_token_id == 1 and ckpt.eos_token_ids == [2]
    assert ckpt.chat_template == "{{ messages[0]['content'] }}"
    spec = build_spec(ckpt.config)  # the config and tensor names are what kiln's specs expect
    weights = load_weights(spec, spec.WEIGHTS, ckpt.tensors, torch.float32, progress=False)
    assert set(weights) == {name for name, _ in spec.named_parameters()}


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe"])
def test_tokenizer_encodes_as_transformers(tmp_path, tiny, gguf_writer, pre):
    path = gguf_writer(tmp_path / "model.gguf", tiny("llama"), pre=pre, quantize=False)
    ours = load_checkpoint(str(path), progress=False).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + DIGIT_TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_smollm_pre_tokenizer_splits_digits_individually(tmp_path, tiny, gguf_writer):
    path = gguf_writer(tmp_path / "model.gguf", tiny("llama"), pre="smollm", quantize=False)
    ours = load_checkpoint(str(path), progress=False).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    for text in DIGIT_TEXTS:  # the vocabulary has "12", "123" and "45": none may appear
        pieces = ours.encode(text).tokens
        assert "".join(pieces).replace("Ġ", " ") == text
        assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p)), pieces


def test_unsupported_architecture_and_missing_metadata_are_named(tmp_path):
    for arch, message in [("mamba", "GGUF architecture 'mamba' is not supported.*llama"),
                          ("llama", "lacks the metadata key 'llama.attention.head_count'")]:
        writer = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
        writer.add_tensor("token_embd.weight", torch.ones(4, 32).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(KilnError, match=message):
            load_checkpoint(str(tmp_path / f"{arch}.gguf"), progress=False)


@pytest.mark.parametrize("extra, message", [
    ("blk.0.attn_gate.weight", "'blk.0.attn_gate.weight' that kiln does not know"),
    ("rope_freqs.weight", "llama3-style rope scaling"),
])
def test_unknown_tensors_are_named(tmp_path, tiny, gguf_writer, extra, message):
    path = gguf_writer(tmp_path / "m.gguf", tiny("llama"), quantize=False, extra_tensors=(extra,))
    with pytest.raises(KilnError, match=message):
        load_checkpoint(str(path), progress=False)


def test_unsupported_tokenizers_and_truncated_file(tmp_path, tiny, gguf_writer):
    path = gguf_writer(tmp_path / "m.gguf", tiny("llama"), tokenizer_model="llama", quantize=False)
    with pytest.raises(KilnError, match="tokenizer is 'llama'; kiln builds only byte-level BPE"):
        load_checkpoint(str(path), progress=False)
    path = gguf_writer(tmp_path / "m.gguf", tiny("llama"), pre="falcon", quantize=False)
    with pytest.raises(KilnError, match="pre-tokenizer 'falcon' is not supported"):
        load_checkpoint(str(path), progress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KilnError, match="cannot read GGUF file"):
        load_checkpoint(str(path), progress=False)


def test_fast_reader_reads_what_gguf_reader_reads(tmp_path, tiny, gguf_writer):
    """kiln's own GGUF parser (gguf.GGUFReader takes ~17 s on a 262k-token vocabulary) gives the same
    metadata values, tensor shapes, types and bytes."""
    from kiln.frontend.checkpoint_gguf import read_gguf_file

    model = tiny("qwen2", tie_word_embeddings=False)
    path = gguf_writer(tmp_path / "m.gguf", model)
    ours = read_gguf_file(path)
    reference = gguf.GGUFReader(path)
    assert ours.metadata == {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    for t in reference.tensors:
        mine = ours.tensors[t.name]
        assert mine.tensor_type == t.tensor_type and mine.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert mine.data.tobytes() == t.data.tobytes(), t.name


def test_file_cut_inside_the_tensor_data_is_named(tmp_path, tiny, gguf_writer):
    path = gguf_writer(tmp_path / "m.gguf", tiny("llama"), quantize=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(KilnError, match="cannot read GGUF file .*ends before tensor .*download it again"):
        load_checkpoint(str(path), progress=False)
