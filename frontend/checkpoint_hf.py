"""Reading a Hugging Face model directory: config.json, safetensors weights (one
`model.safetensors`, or shards listed in `model.safetensors.index.json`), tokenizer.json,
tokenizer_config.json, chat_template.jinja and generation_config.json.

Every weight file's header is read up front (cheap: the data is memory-mapped), so a damaged or
missing file is reported when the checkpoint is opened, not halfway through loading it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from kiln.errors import KilnError
from kiln.frontend.checkpoint_types import Checkpoint, LazyTensors
from kiln.frontend.tokenizer import gather_ids, read_hf_chat_template, read_hf_tokenizer, read_json, token_id

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
WHAT_A_MODEL_DIR_HOLDS = (f"config.json and the weights as {SINGLE_FILE} or as shards listed in {SHARD_INDEX} "
                          "(plus tokenizer.json, tokenizer_config.json, generation_config.json)")


def read_hf_dir(path: Path, source: str, *, progress: bool) -> Checkpoint:
    """The checkpoint in HF directory `path`; tensors keep their stored dtype."""
    if not (path / "config.json").exists():
        raise KilnError(f"{path} is not a model directory: it has no config.json. A model directory holds "
                        f"{WHAT_A_MODEL_DIR_HOLDS}")
    config = read_json(path / "config.json")
    loaders = _tensor_loaders(path)
    tokenizer = read_hf_tokenizer(path)
    tokenizer_config = _optional_json(path / "tokenizer_config.json")
    generation_config = _optional_json(path / "generation_config.json")
    bos_candidates = [generation_config.get("bos_token_id"), config.get("bos_token_id"),
                      token_id(tokenizer, tokenizer_config.get("bos_token"))]
    return Checkpoint(
        source=source, path=path, config=config,
        tensors=LazyTensors(loaders, description=f"reading {path.name}", progress=progress),
        tokenizer=tokenizer, chat_template=read_hf_chat_template(path, tokenizer_config),
        generation_config=generation_config,
        bos_token_id=next((i for i in bos_candidates if i is not None), None),
        eos_token_ids=gather_ids([generation_config.get("eos_token_id"), config.get("eos_token_id"),
                                  token_id(tokenizer, tokenizer_config.get("eos_token"))]))


def _optional_json(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def _tensor_loaders(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Tensor name -> a function reading it, over the single file or all shards of the index."""
    if (path / SHARD_INDEX).exists():
        weight_map = read_json(path / SHARD_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise KilnError(f"{path / SHARD_INDEX} has no `weight_map`; restore it from the original checkpoint")
    elif (path / SINGLE_FILE).exists():
        weight_map = None
    else:
        raise KilnError(f"{path} has a config.json but no weights: a model directory holds {WHAT_A_MODEL_DIR_HOLDS}. "
                        "kiln reads safetensors only; convert other formats with transformers' save_pretrained")
    if weight_map is None:
        handle = _open_safetensors(path / SINGLE_FILE)
        return {name: _loader(handle, name) for name in handle.keys()}
    handles = {}
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).exists():
            raise KilnError(f"shard {shard} listed in {SHARD_INDEX} is missing from {path}; "
                            "download the checkpoint again")
        handles[shard] = _open_safetensors(path / shard)
    names_in = {shard: set(handle.keys()) for shard, handle in handles.items()}
    loaders = {}
    for name, shard in weight_map.items():
        if name not in names_in[shard]:
            raise KilnError(f"{SHARD_INDEX} places tensor {name!r} in {shard}, which does not hold it; "
                            "download the checkpoint again")
        loaders[name] = _loader(handles[shard], name)
    return loaders


def _open_safetensors(file: Path):
    """A safetensors handle whose header has been validated (the data stays memory-mapped)."""
    try:
        return safe_open(str(file), framework="pt")
    except Exception as error:  # SafetensorError for a bad header, OSError for an unreadable file
        raise KilnError(f"cannot read {file}: {error}; the file is damaged or truncated, "
                        "download the checkpoint again") from error


def _loader(handle, name: str) -> Callable[[], torch.Tensor]:
    return lambda: handle.get_tensor(name)
