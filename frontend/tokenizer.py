"""Tokenizers and chat templates: read from an HF directory's files, or built from a GGUF file's
BPE vocabulary; and the special token ids (bos, eos) gathered from wherever a checkpoint keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from kiln.errors import KilnError

# llama.cpp `tokenizer.ggml.pre` name -> how that vocabulary splits text before byte-level BPE.
# The split patterns are the ones the original HF tokenizers use (llama.cpp copies them).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


GGUF_PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    # SmolLM2 (and SmolLM): GPT-2's split, after cutting every digit into its own piece.
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
}

# llama.cpp token types (`tokenizer.ggml.token_type`).
_CONTROL, _USER_DEFINED = 3, 4


def gguf_tokenizer(metadata: dict) -> Tokenizer:
    """A byte-level BPE tokenizer from a GGUF file's `tokenizer.*` metadata (plain python values):
    the vocabulary and merges, the pre-tokenizer its `tokenizer.ggml.pre` names, control tokens
    added as special tokens and user-defined ones as plain added tokens."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise KilnError(f"this GGUF file's tokenizer is {kind!r}; kiln builds only byte-level BPE ('gpt2') "
                        "tokenizers from GGUF files: use the model's HF directory instead")
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise KilnError(f"this GGUF file's pre-tokenizer {pre!r} is not supported (kiln knows "
                        f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))}): use the model's HF directory instead")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(BPE({token: i for i, token in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, token_type in zip(tokens, types) if token_type == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, token_type in zip(tokens, types) if token_type == _USER_DEFINED])
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return tokenizer


def read_json(path: Path) -> dict:
    """The JSON object in `path`; a KilnError naming the file if it cannot be read or parsed."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KilnError(f"cannot read {path}: {error}; the file is damaged, restore it from the original "
                        "checkpoint") from error
    if not isinstance(content, dict):
        raise KilnError(f"{path} does not hold a JSON object; restore it from the original checkpoint")
    return content


def read_hf_tokenizer(directory: Path) -> Tokenizer | None:
    """The `tokenizer.json` of an HF directory, or None if it has none."""
    path = directory / "tokenizer.json"
    if not path.exists():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise KilnError(f"cannot read {path}: {error}; restore it from the original checkpoint") from error


def read_hf_chat_template(directory: Path, tokenizer_config: dict) -> str | None:
    """The chat template: `chat_template.jinja` (newer transformers) or tokenizer_config.json's
    `chat_template` (a string, or a list of named templates whose "default" one is used)."""
    path = directory / "chat_template.jinja"
    if path.exists():
        return path.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default", template[0]["template"] if template else None)
    return template


def token_id(tokenizer: Tokenizer | None, token: str | dict | None) -> int | None:
    """The id of a special token as tokenizer_config.json writes it (a string, or a dict with
    "content"), or None if there is no such token or no tokenizer to look it up in."""
    if tokenizer is None or token is None:
        return None
    return tokenizer.token_to_id(token["content"] if isinstance(token, dict) else token)


def gather_ids(values: Sequence[int | list[int] | None]) -> list[int]:
    """The distinct ids among `values` (each an id, a list of ids, or None), in order of appearance."""
    ids: list[int] = []
    for value in values:
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids
