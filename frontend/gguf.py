"""Reading a llama.cpp GGUF file as an HF-form checkpoint.

What differs between architectures is data, one `GGUFArchitecture` record each in
`ARCHITECTURES`: the HF class and model type, llama.cpp's per-layer tensor names -> HF names, how
the converter altered stored tensors (q/k rows permuted for llama.cpp's rope layout; Gemma norm
weights stored as 1 + w), and the config fields the `<arch>.*` metadata implies. Tensors are
dequantized to fp32 when looked up and put back in HF's form (un-permuted, norm offset removed).
2-D tensors of a type in `gguf_quant.KEPT_TYPES` are also offered still quantized, repacked into
kiln's layout and un-permuted the same way (`Checkpoint.quantized`).
"""

from __future__ import annotations

import logging
import re
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from kiln.errors import KilnError
from kiln.frontend.checkpoint_gguf import GGUFTensor, read_gguf_file
from kiln.frontend.checkpoint_types import Checkpoint, LazyTensors
from kiln.frontend.gguf_quant import KEPT_TYPES, repack
from kiln.frontend.tokenizer import GEMMA_CHAT_TEMPLATE, gather_ids, gguf_tokenizer
from kiln.quant import QuantizedTensor

log = logging.getLogger("kiln.gguf")

# Tensor types kiln dequantizes (through gguf.quants); others (IQ*, TQ*, ...) are refused up front.
TENSOR_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                          Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})


class Metadata:
    """The `<arch>.*` metadata of one file: `meta("block_count")`; a KilnError for a missing key
    without a default."""

    def __init__(self, metadata: dict):
        self.values = metadata
        self.prefix = metadata["general.architecture"] + "."

    def __call__(self, key: str, default=None):
        value = self.values.get(self.prefix + key, default)
        if value is None:
            raise KilnError(f"this GGUF file lacks the metadata key {self.prefix + key!r}; it is damaged or "
                            "was written by an incomplete converter")
        return value


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one `general.architecture` maps to HF."""

    hf_architecture: str                   # the HF `architectures` entry
    model_type: str                        # the HF `model_type`
    layer_tensors: Mapping[str, str]       # llama.cpp name under blk.N -> HF module under model.layers.N
    config: Callable[[Metadata, dict, dict], dict]  # (metadata, common config, stored tensors) -> its own fields
    permuted_qk: bool = False              # llama.cpp's converter permuted the q/k rows (weights and biases)
    norm_offset: float = 0.0               # the converter stored every `*norm.weight` as w + norm_offset
    chat_template: str | None = None       # for files that carry none (llama.cpp has it built in)
    end_of_turn: tuple[str, ...] = ()      # tokens that also end generation (llama.cpp's end-of-generation set)
    constants: Mapping[str, object] = field(default_factory=dict)  # config fields llama.cpp fixes for the arch


# llama.cpp tensor name (without .weight/.bias) -> HF name, the same for every architecture.
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ATTENTION_AND_MLP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LLAMA_LAYER_TENSORS = {**_ATTENTION_AND_MLP, "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# Gemma 2/3 norm before and after both attention and MLP; llama.cpp's `ffn_norm` is the pre-MLP one.
GEMMA_LAYER_TENSORS = {
    **_ATTENTION_AND_MLP,
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _llama_config(meta: Metadata, config: dict, stored: dict, *, bias_in_config: bool) -> dict:
    """Llama / Qwen2 / Qwen3: SiLU MLP, one rope; `attention_bias` where HF's config has it
    (Qwen2's class fixes its q/k/v biases instead)."""
    own = {"hidden_act": "silu", "rope_parameters": _rope_parameters(meta)}
    if bias_in_config:
        own["attention_bias"] = "blk.0.attn_q.bias" in stored
    return own


def _gemma_config(meta: Metadata, config: dict, stored: dict, *, swa_pattern: int, layers_27b: int) -> dict:
    """What Gemma 2 and 3 share, as llama.cpp's gemma2/gemma3 models read it: one full-attention
    layer in every `swa_pattern` (the others slide over `attention.sliding_window` tokens), and
    queries scaled by head_dim^-1/2, except hidden/heads for the 27B (known by its layer count)."""
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    return {
        "layer_types": ["sliding_attention" if (i + 1) % swa_pattern else "full_attention" for i in range(layers)],
        "sliding_window": int(meta("attention.sliding_window")),
        "query_pre_attn_scalar": config["hidden_size"] // heads if layers == layers_27b else config["head_dim"],
        "pad_token_id": meta.values.get("tokenizer.ggml.padding_token_id"),
    }


def _gemma2_config(meta: Metadata, config: dict, stored: dict) -> dict:
    """Gemma 2: sliding and full layers alternate; one rope; attention scores and final logits
    soft-capped by the file's values (llama.cpp's defaults 50 and 30 where it has none)."""
    return {**_gemma_config(meta, config, stored, swa_pattern=2, layers_27b=46),
            "rope_parameters": _rope_parameters(meta),
            "attn_logit_softcapping": _float32(meta("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": _float32(meta("final_logit_softcapping", 30.0))}


def _gemma3_config(meta: Metadata, config: dict, stored: dict) -> dict:
    """Gemma 3 (text): one full layer in six; sliding layers rotate with base 10000 and no scaling
    (llama.cpp's rope_freq_base_train_swa, HF's rope_local_base_freq), full ones with
    `rope.freq_base` and the file's linear scaling."""
    return {**_gemma_config(meta, config, stored, swa_pattern=GEMMA3_SWA_PATTERN, layers_27b=62),
            "rope_parameters": {"full_attention": _rope_parameters(meta),
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}


GEMMA3_SWA_PATTERN = 6  # llama.cpp: hparams.set_swa_pattern(6), as transformers' default
_GEMMA = dict(layer_tensors=GEMMA_LAYER_TENSORS, norm_offset=1.0, chat_template=GEMMA_CHAT_TEMPLATE,
              end_of_turn=("<end_of_turn>",))
_GEMMA_CONSTANTS = {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "attention_dropout": 0.0}

ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("LlamaForCausalLM", "llama", LLAMA_LAYER_TENSORS, permuted_qk=True,
                              config=lambda m, c, s: _llama_config(m, c, s, bias_in_config=True)),
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM", "qwen2", LLAMA_LAYER_TENSORS,
                              config=lambda m, c, s: _llama_config(m, c, s, bias_in_config=False)),
    "qwen3": GGUFArchitecture("Qwen3ForCausalLM", "qwen3", LLAMA_LAYER_TENSORS,
                              config=lambda m, c, s: _llama_config(m, c, s, bias_in_config=True)),
    "gemma2": GGUFArchitecture("Gemma2ForCausalLM", "gemma2", config=_gemma2_config, **_GEMMA,
                               constants=_GEMMA_CONSTANTS),
    "gemma3": GGUFArchitecture("Gemma3ForCausalLM", "gemma3_text", config=_gemma3_config, **_GEMMA,
                               constants={**_GEMMA_CONSTANTS, "attn_logit_softcapping": None,
                                          "final_logit_softcapping": None, "use_bidirectional_attention": False,
                                          "_sliding_window_pattern": GEMMA3_SWA_PATTERN}),
}

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_NAME = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_tensor_name(name: str, arch: GGUFArchitecture) -> str:
    """The HF name of llama.cpp tensor `name`; a KilnError for a tensor kiln does not know."""
    if found := _LAYER_NAME.match(name):
        layer, base, kind = found.groups()
        if base in arch.layer_tensors:
            return f"model.layers.{layer}.{arch.layer_tensors[base]}.{kind}"
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
    """The checkpoint in GGUF file `path` (tensors dequantized to fp32 when looked up; those of
    kept types also offered quantized)."""
    try:
        file = read_gguf_file(path)
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as error:
        raise KilnError(f"cannot read GGUF file {path}: {error}; the file is damaged or not a GGUF "
                        "file, download it again") from error
    metadata = file.metadata
    arch_name = metadata.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise KilnError(f"GGUF architecture {arch_name!r} is not supported; kiln reads GGUF files of "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    arch = ARCHITECTURES[arch_name]
    stored = file.tensors
    _check_tensor_types(stored.values())
    _log_dequantized_types(stored.values())
    config = hf_config(metadata, arch, stored)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    loaders, quantized, quant_formats = {}, {}, {}
    for name, tensor in stored.items():
        layer_tensor = _LAYER_NAME.match(name)
        n_head = heads.get(layer_tensor.group(2)) if layer_tensor and arch.permuted_qk else None
        offset = arch.norm_offset if name.endswith("norm.weight") else 0.0
        hf_name = hf_tensor_name(name, arch)
        loaders[hf_name] = _loader(tensor, n_head, offset)
        if tensor.tensor_type in KEPT_TYPES and len(tensor.shape) == 2 and not offset:
            quantized[hf_name] = _quantized_loader(tensor, n_head)
            quant_formats[hf_name] = KEPT_TYPES[tensor.tensor_type]
    tokenizer = gguf_tokenizer(metadata)
    end_of_turn = [tokenizer.token_to_id(token) for token in arch.end_of_turn]
    tensors = LazyTensors(loaders, description=f"reading {path.name}", progress=progress)
    quantized = {name: _counted(load, name, tensors) for name, load in quantized.items()}
    return Checkpoint(
        source=source, path=path, config=config, tensors=tensors,
        tokenizer=tokenizer, chat_template=metadata.get("tokenizer.chat_template", arch.chat_template),
        generation_config={}, bos_token_id=config.get("bos_token_id"),
        eos_token_ids=gather_ids([config.get("eos_token_id"), metadata.get("tokenizer.ggml.eot_token_id"),
                                  end_of_turn]),
        quantized=quantized, quant_formats=quant_formats)


def _log_dequantized_types(tensors) -> None:
    """One log line naming the block-quantized types whose tensors are read dequantized."""
    dense = Counter(t.tensor_type.name for t in tensors if t.tensor_type not in {*KEPT_TYPES, Q.F32, Q.F16, Q.BF16})
    if dense:
        log.info("GGUF tensors dequantized to fp32 (kiln keeps only %s quantized): %s",
                 ", ".join(t.name for t in KEPT_TYPES), ", ".join(f"{n} {name}" for name, n in sorted(dense.items())))


def _check_tensor_types(tensors) -> None:
    for tensor in tensors:
        if tensor.tensor_type not in TENSOR_TYPES:
            raise KilnError(f"this GGUF file stores tensor {tensor.name!r} as {tensor.tensor_type.name}, which kiln "
                            f"does not dequantize; kiln reads {', '.join(t.name for t in sorted(TENSOR_TYPES))}: "
                            "use a file quantized to one of those")


def _loader(tensor: GGUFTensor, n_head: int | None, offset: float) -> Callable[[], torch.Tensor]:
    """Reads `tensor` as fp32 in HF's [rows, cols] order, un-permuted when n_head is given, less
    `offset` (the converter's norm offset)."""

    def load() -> torch.Tensor:
        values = dequantize(tensor.data, tensor.tensor_type)
        if np.may_share_memory(values, tensor.data) or values.dtype != np.float32:  # F32: a view of the mmap
            values = np.array(values, dtype=np.float32)
        w = torch.from_numpy(values.reshape(tensor.shape))
        if offset:
            w -= offset  # in fp32, as transformers' GGUF loader does
        return unpermute_rows(w, n_head) if n_head is not None else w
    return load


def _quantized_loader(tensor: GGUFTensor, n_head: int | None) -> Callable[[], QuantizedTensor]:
    """Reads 2-D `tensor` (of a kept type) repacked into kiln's layout, its rows un-permuted when
    n_head is given (the rows `_loader` returns, in the same order)."""

    def load() -> QuantizedTensor:
        weight = repack(tensor)
        if n_head is None:
            return weight
        return weight.rows(unpermute_rows(torch.arange(weight.shape[0]), n_head))
    return load


def _counted(load: Callable[[], QuantizedTensor], name: str, tensors: LazyTensors) -> Callable[[], QuantizedTensor]:
    """`load`, counted as a read of `name` on the progress bar of `tensors`."""
    def counted_load() -> QuantizedTensor:
        weight = load()
        tensors.count_read(name)
        return weight
    return counted_load


def hf_config(metadata: dict, arch: GGUFArchitecture, stored: dict) -> dict:
    """An HF config.json dict for the GGUF metadata (`<arch>.*`, `tokenizer.ggml.*`)."""
    meta = Metadata(metadata)
    embedding = stored.get("token_embd.weight")
    if embedding is None:
        raise KilnError("this GGUF file has no `token_embd.weight` tensor; it is damaged or not a language model")
    heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", meta("embedding_length") // heads))
    rotary_dim = int(meta("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise KilnError(f"this GGUF file rotates {rotary_dim} of {head_dim} head dims (partial rope), "
                        "which kiln does not support for this architecture")
    if (value_dim := int(meta("attention.value_length", head_dim))) != head_dim:
        raise KilnError(f"this GGUF file has value heads of {value_dim} dims and key heads of {head_dim}, "
                        "which kiln does not support")
    config = {
        "architectures": [arch.hf_architecture],
        "model_type": arch.model_type,
        "hidden_size": int(meta("embedding_length")),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _float32(meta("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(meta("context_length")),
        "vocab_size": int(meta("vocab_size", embedding.shape[0])),
        "tie_word_embeddings": "output.weight" not in stored,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    return {**config, **arch.constants, **arch.config(meta, config, stored)}


def _rope_parameters(meta: Metadata) -> dict:
    theta = _float32(meta("rope.freq_base", 10000.0))
    scaling = meta("rope.scaling.type", "none")
    if scaling == "linear" and _float32(meta("rope.scaling.factor")) == 1.0:
        scaling = "none"
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": _float32(meta("rope.scaling.factor"))}
    raise KilnError(f"this GGUF file uses rope scaling {scaling!r}, which kiln does not read from GGUF "
                    "files: load the model's HF directory instead")


def _float32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that names it (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))
