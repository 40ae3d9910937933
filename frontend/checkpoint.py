"""Loading a checkpoint (a built-in name, an HF directory or a .gguf file) into one HF-form
`Checkpoint`, and saving one as a plain HF directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from kiln.errors import KilnError
from kiln.frontend.builtin import BUILTIN_MODELS
from kiln.frontend.checkpoint_hf import read_hf_dir
from kiln.frontend.checkpoint_types import Checkpoint

__all__ = ["Checkpoint", "load_checkpoint", "resolve_model_path", "save_hf_dir"]


def load_checkpoint(name_or_path: str, *, progress: bool = True) -> Checkpoint:
    """The checkpoint named by a built-in name (`smollm2-135m`), an HF model directory or a .gguf
    file. Tensors are read lazily, on lookup; `progress` shows a bar on stderr as they are read."""
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        return read_hf_dir(path, name_or_path, progress=progress)
    if path.suffix == ".gguf":
        # imported here: the `gguf` package is needed only for .gguf files (the GPU machine lacks it)
        from kiln.frontend.gguf import read_gguf

        return read_gguf(path, name_or_path, progress=progress)
    raise KilnError(f"{path} is neither a model directory nor a .gguf file; give a directory holding config.json "
                    "and safetensors weights, or a .gguf file")


def resolve_model_path(name_or_path: str) -> Path:
    """The file or directory a built-in name or a path stands for (KilnError if there is none)."""
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path].locate()
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path.resolve()
    if _looks_like_a_path(name_or_path):
        raise KilnError(f"{name_or_path} does not exist; give a local model directory or .gguf file "
                        "(kiln does not download models)")
    raise KilnError(f"unknown model {name_or_path!r}: it is not a built-in name (known: "
                    f"{', '.join(BUILTIN_MODELS)}) nor an existing path")


def _looks_like_a_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith(("~", ".")) or text.endswith(".gguf")


def save_hf_dir(ckpt: Checkpoint, out_dir: Path) -> None:
    """Writes `ckpt` as an HF directory transformers can load: config.json, model.safetensors
    (every tensor, in its dtype), tokenizer.json, tokenizer_config.json (with the chat template
    and bos/eos tokens) and generation_config.json (with the bos/eos ids)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", ckpt.config)
    tensors = {name: tensor.contiguous() for name, tensor in ckpt.tensors.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    generation_config = {**ckpt.generation_config, "bos_token_id": ckpt.bos_token_id}
    if ckpt.eos_token_ids:
        generation_config["eos_token_id"] = ckpt.eos_token_ids if len(ckpt.eos_token_ids) > 1 else ckpt.eos_token_ids[0]
    _write_json(out_dir / "generation_config.json", generation_config)
    if ckpt.tokenizer is None:
        return
    ckpt.tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": ckpt.chat_template}
    if ckpt.bos_token_id is not None:
        tokenizer_config["bos_token"] = ckpt.tokenizer.id_to_token(ckpt.bos_token_id)
    if ckpt.eos_token_ids:
        tokenizer_config["eos_token"] = ckpt.tokenizer.id_to_token(ckpt.eos_token_ids[0])
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
