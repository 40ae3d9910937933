"""What a loaded checkpoint is: `Checkpoint` (config, lazy tensors, tokenizer, chat template,
special token ids) and `LazyTensors`, the read-on-access mapping of HF tensor names to tensors.

Both readers (`checkpoint_hf` for HF directories, `gguf` for llama.cpp files) produce these, so
everything downstream sees one checkpoint form with HF names and an HF-style config dict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
from tqdm import tqdm


class LazyTensors(Mapping[str, torch.Tensor]):
    """HF tensor name -> tensor, each read from disk (and converted) when it is looked up.

    Nothing is cached: every lookup reads again, so the caller keeps what it needs. A progress
    bar (stderr) counts distinct tensors read and closes once all of them have been read.
    """

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]], *, description: str, progress: bool):
        self._loaders = loaders
        self._description = description
        self._progress = progress
        self._read: set[str] = set()
        self._bar: tqdm | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._loaders[name]()
        if name not in self._read:
            self._count_read(name)
        return tensor

    def _count_read(self, name: str) -> None:
        if self._bar is None:
            self._bar = tqdm(total=len(self._loaders), desc=self._description, unit="tensor",
                             disable=not self._progress)
        self._read.add(name)
        self._bar.update(1)
        if len(self._read) == len(self._loaders):
            self._bar.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __contains__(self, name: object) -> bool:
        return name in self._loaders


@dataclass
class Checkpoint:
    """A model checkpoint in HF form, whatever file format it came from.

    `tensors` uses HF names (`model.layers.0.self_attn.q_proj.weight`) and keeps each tensor's
    stored dtype (GGUF tensors are dequantized to fp32); the caller casts. `config` is the
    content of an HF config.json (synthesized from metadata for GGUF files).
    """

    source: str                            # what the user gave: a built-in name or a path
    path: Path                             # the resolved directory or .gguf file
    config: dict
    tensors: Mapping[str, torch.Tensor]
    tokenizer: tokenizers.Tokenizer | None
    chat_template: str | None              # jinja2 source
    generation_config: dict                # {} if the checkpoint has none
    bos_token_id: int | None
    eos_token_ids: list[int]
