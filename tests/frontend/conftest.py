"""Shared fixtures for the checkpoint tests: tiny random HF models, and a writer of GGUF files
that follows llama.cpp's converter conventions (written here independently of kiln's reader:
llama.cpp tensor names, its forward q/k row permutation for the llama architecture, metadata keys).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import pre_tokenizers

TINY = dict(vocab_size=270, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
CONFIG_CLASSES = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config}


def tiny_model(arch: str, **overrides) -> transformers.PreTrainedModel:
    """A random tiny HF causal LM of `arch` whose norms and biases are not at their init values."""
    torch.manual_seed(0)
    config = CONFIG_CLASSES[arch](**{**TINY, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.config.architectures = [type(model).__name__]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


# A byte-level BPE vocabulary: a control token, the 256 byte symbols, a few merges, a user-defined token.
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "Ġ Ġ", "a n", "an d", "Ġ and", "4 5"]
TOKENS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + ALPHABET + [m.replace(" ", "") for m in MERGES]
          + ["<think>"])
TOKEN_TYPES = [3, 3, 3] + [1] * (len(TOKENS) - 4) + [4]
assert len(TOKENS) == TINY["vocab_size"]

# HF module name -> llama.cpp name (per layer under model.layers.N / blk.N).
_GGUF_NAMES = [
    ("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output"),
    ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"), ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
]


def gguf_name(hf_name: str) -> str:
    module, kind = hf_name.rsplit(".", 1)
    prefix = ""
    if module.startswith("model.layers."):
        layer, module = module.removeprefix("model.layers.").split(".", 1)
        prefix = f"blk.{layer}."
    return prefix + dict(_GGUF_NAMES)[module] + "." + kind


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` (HF rotate_half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, *, pre: str = "smollm", tokenizer_model: str = "gpt2", quantize: bool = True,
               chat_template: str | None = "{{ messages[0]['content'] }}",
               extra_tensors: tuple[str, ...] = ()) -> Path:
    """Writes `model` (a tiny llama/qwen2/qwen3) as llama.cpp would; 2-D weights as Q8_0 if `quantize`;
    `extra_tensors` are written as fp32 ones of shape [32]."""
    cfg = model.config
    arch = cfg.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(hf_name)
        w = tensor.float().numpy()
        base = name.split(".")[-2]
        if arch == "llama" and base in heads:
            w = llama_cpp_permute(w, heads[base])
        if quantize and w.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w))
    for name in extra_tensors:
        writer.add_tensor(name, np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def q8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """w after Q8_0 quantization and dequantization (what a Q8_0 GGUF file holds)."""
    q = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy())


@pytest.fixture
def tiny():
    return tiny_model


@pytest.fixture
def gguf_writer():
    return write_gguf


@pytest.fixture
def q8():
    return q8_roundtrip


@pytest.fixture
def bpe_vocab():
    """(tokens, merges): the tiny byte-level BPE vocabulary; tokens 0-2 are control tokens."""
    return TOKENS, MERGES
