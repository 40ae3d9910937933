"""What a loaded checkpoint is: `Checkpoint` (config, lazy tensors, weights kept quantized,
tokenizer, chat template, special token ids) and `LazyTensors`, the read-on-access mapping of HF
tensor names to tensors.

Both readers (`checkpoint_hf` for HF directories, `gguf` for llama.cpp files) produce these, so
everything downstream sees one checkpoint form with HF names and an HF-style config dict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
import torch
from tqdm import tqdm

from kiln.quant import QuantFormat, QuantizedTensor


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
        self.count_read(name)
        return tensor

    def count_read(self, name: str) -> None:
        """Counts tensor `name` as read (also when it was read another way: still quantized)."""
        if name in self._read:
            return
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

    `quantized` offers the weights the file stores in a quantized form kiln keeps (GGUF's, see
    frontend/gguf_quant.py) a second way: HF name -> a loader of the weight as a QuantizedTensor,
    in the same row order as `tensors[name]` (which stays the fp32 form of the same values);
    `quant_formats` has the same keys and says each one's format without loading it.
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
    quantized: Mapping[str, Callable[[], QuantizedTensor]] = field(default_factory=dict)
    quant_formats: Mapping[str, QuantFormat] = field(default_factory=dict)
