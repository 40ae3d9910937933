"""Reading a llama.cpp GGUF file as an HF-form checkpoint.

The config is synthesized in HF form from the `<arch>.*` metadata; tensors are renamed from
llama.cpp's names (`blk.3.attn_q.weight`) to HF's (`model.layers.3.self_attn.q_proj.weight`),
dequantized to fp32 when looked up, and, for architectures whose converter permutes the q/k rows
for llama.cpp's rope layout, un-permuted back to HF's "rotate_half" layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from kiln.errors import KilnError
from kiln.frontend.checkpoint_types import Checkpoint, LazyTensors
from kiln.frontend.tokenizer import gather_ids, gguf_tokenizer


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one `general.architecture` maps to HF."""

    hf_architecture: str     # the HF `architectures` entry
    model_type: str          # the HF `model_type`
    permuted_qk: bool        # llama.cpp's converter permuted the q/k rows (weights and biases)
    bias_in_config: bool     # HF's config says `attention_bias` (q/k/v/o); else the class fixes it


ARCHITECTURES = {
    "llama": GGUFArchitecture("LlamaForCausalLM", "llama", permuted_qk=True, bias_in_config=True),
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM", "qwen2", permuted_qk=False, bias_in_config=False),
    "qwen3": GGUFArchitecture("Qwen3ForCausalLM", "qwen3", permuted_qk=False, bias_in_config=True),
}

# llama.cpp tensor name (without .weight/.bias) -> HF name; per-layer ones under blk.N / model.layers.N.
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_NAME = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_tensor_name(name: str) -> str:
    """The HF name of llama.cpp tensor `name`; a KilnError for a tensor kiln does not know."""
    if found := _LAYER_NAME.match(name):
        layer, base, kind = found.groups()
        if base in LAYER_TENSORS:
            return f"model.layers.{layer}.{LAYER_TENSORS[base]}.{kind}"
    elif (found := _GLOBAL_NAME.match(name)) and found.group(1) in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[found.group(1)]}.{found.group(2)}"
    if name == "rope_freqs.weight":
        raise KilnError("this GGUF file stores llama3-style rope scaling as a `rope_freqs` tensor, which kiln "
                        "cannot map back to an HF config: load the model's HF directory instead")
    raise KilnError(f"this GGUF file has a tensor {name!r} that kiln does not know how to map; "
                    "load the model's HF directory instead")


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation. w: [rows, ...] (a weight [rows, cols] or a bias [rows]),
    rows = n_head * head_dim; llama.cpp interleaves each head's two rotary halves, HF keeps them
    as contiguous halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path, source: str, *, progress: bool) -> Checkpoint:
    """The checkpoint in GGUF file `path` (tensors dequantized to fp32 when looked up)."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # gguf raises ValueError, struct.error, IndexError... on a damaged file
        raise KilnError(f"cannot read GGUF file {path}: {error}; the file is damaged or not a GGUF "
                        "file, download it again") from error
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    arch_name = metadata.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise KilnError(f"GGUF architecture {arch_name!r} is not supported; kiln reads GGUF files of "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    arch = ARCHITECTURES[arch_name]
    stored = {t.name: t for t in reader.tensors}
    config = hf_config(metadata, arch, stored)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    loaders = {}
    for name, tensor in stored.items():
        layer_tensor = _LAYER_NAME.match(name)
        n_head = heads.get(layer_tensor.group(2)) if layer_tensor and arch.permuted_qk else None
        loaders[hf_tensor_name(name)] = _loader(tensor, n_head)
    tokenizer = gguf_tokenizer(metadata)
    return Checkpoint(
        source=source, path=path, config=config,
        tensors=LazyTensors(loaders, description=f"reading {path.name}", progress=progress),
        tokenizer=tokenizer, chat_template=metadata.get("tokenizer.chat_template"), generation_config={},
        bos_token_id=config.get("bos_token_id"), eos_token_ids=gather_ids([config.get("eos_token_id"),
                                                                          metadata.get("tokenizer.ggml.eot_token_id")]))


def _loader(tensor: gguf.ReaderTensor, n_head: int | None) -> Callable[[], torch.Tensor]:
    """Reads `tensor` as fp32 in HF's [rows, cols] order, un-permuted when n_head is given."""
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first

    def load() -> torch.Tensor:
        values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # copies the mmap
        w = torch.from_numpy(values.reshape(shape))
        return unpermute_rows(w, n_head) if n_head is not None else w
    return load


def hf_config(metadata: dict, arch: GGUFArchitecture, stored: dict) -> dict:
    """An HF config.json dict for the GGUF metadata (`<arch>.*`, `tokenizer.ggml.*`)."""
    prefix = metadata["general.architecture"] + "."

    def meta(key: str, default=None):
        value = metadata.get(prefix + key, default)
        if value is None:
            raise KilnError(f"this GGUF file lacks the metadata key {prefix + key!r}; it is damaged or "
                            "was written by an incomplete converter")
        return value

    embedding = stored.get("token_embd.weight")
    if embedding is None:
        raise KilnError("this GGUF file has no `token_embd.weight` tensor; it is damaged or not a language model")
    heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", meta("embedding_length") // heads))
    rotary_dim = int(meta("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise KilnError(f"this GGUF file rotates {rotary_dim} of {head_dim} head dims (partial rope), "
                        "which kiln does not support for this architecture")
    config = {
        "architectures": [arch.hf_architecture],
        "model_type": arch.model_type,
        "hidden_size": int(meta("embedding_length")),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32(meta("attention.layer_norm_rms_epsilon")),
        "rope_parameters": _rope_parameters(meta),
        "max_position_embeddings": int(meta("context_length")),
        "vocab_size": int(meta("vocab_size", embedding.shape[-1])),
        "tie_word_embeddings": "output.weight" not in stored,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if arch.bias_in_config:
        config["attention_bias"] = "blk.0.attn_q.bias" in stored
    return config


def _rope_parameters(meta: Callable) -> dict:
    theta = _float32(meta("rope.freq_base", 10000.0))
    scaling = meta("rope.scaling.type", "none")
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": _float32(meta("rope.scaling.factor"))}
    raise KilnError(f"this GGUF file uses rope scaling {scaling!r}, which kiln does not read from GGUF "
                    "files: load the model's HF directory instead")


def _float32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that names it (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))
