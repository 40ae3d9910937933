"""Tokenizers and chat templates: read from an HF directory's files, or built from a GGUF file's
vocabulary (byte-level BPE, or Gemma's SentencePiece BPE); and the special token ids (bos, eos)
gathered from wherever a checkpoint keeps them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
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
    """The tokenizer a GGUF file's `tokenizer.*` metadata (plain python values) describes, by its
    `tokenizer.ggml.model`: byte-level BPE ("gpt2") or SentencePiece-style BPE ("llama"); control
    tokens added as special tokens, user-defined ones as plain added tokens, and BOS prepended if
    the file says so."""
    kind, arch = metadata.get("tokenizer.ggml.model"), metadata.get("general.architecture")
    if kind not in GGUF_TOKENIZER_MODELS or (kind == "llama" and arch not in SENTENCEPIECE_ARCHITECTURES):
        raise KilnError(f"this GGUF file's tokenizer is {kind!r}; kiln builds only byte-level BPE ('gpt2') "
                        f"tokenizers from GGUF files, and SentencePiece ('llama') ones for "
                        f"{', '.join(SENTENCEPIECE_ARCHITECTURES)} (this file is {arch!r}): use the model's HF "
                        "directory instead")
    tokenizer = GGUF_TOKENIZER_MODELS[kind](metadata)
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, token_type in zip(tokens, types) if token_type == _CONTROL])
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, token_type in zip(tokens, types) if token_type == _USER_DEFINED and t in vocab])
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default for SentencePiece
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return tokenizer


def _byte_level_bpe(metadata: dict) -> Tokenizer:
    """GPT-2 style: the vocabulary spelled in the byte alphabet, the file's merges, and the
    pre-tokenizer its `tokenizer.ggml.pre` names."""
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise KilnError(f"this GGUF file's pre-tokenizer {pre!r} is not supported (kiln knows "
                        f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))}): use the model's HF directory instead")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(BPE({token: i for i, token in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


# Architectures whose SentencePiece vocabulary kiln knows how to rebuild (Gemma's: no prefix space,
# spaces written "▁", byte fallback, merges in vocabulary order).
SENTENCEPIECE_ARCHITECTURES = ("gemma2", "gemma3")


def _sentencepiece_bpe(metadata: dict) -> Tokenizer:
    """A SentencePiece BPE vocabulary (Gemma's) as a `tokenizers` BPE, built as transformers'
    GGUF loader builds `GemmaTokenizer`: spaces become "▁" (tokens of only spaces, which the file
    spells with real spaces, are respelled), unknown bytes fall back to `<0xNN>` tokens, and the
    merges, which the file lacks, come from the vocabulary: every token, in file order, split
    into two tokens of the vocabulary, longest left part first."""
    if metadata.get("tokenizer.ggml.add_space_prefix", False):
        raise KilnError("this GGUF file's SentencePiece tokenizer adds a prefix space, which kiln does not "
                        "build: use the model's HF directory instead")
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in metadata["tokenizer.ggml.tokens"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [(token[:cut], token[cut:]) for token in tokens for cut in range(len(token) - 1, 0, -1)
              if token[:cut] in vocab and token[cut:] in vocab]
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=tokens[unk_id] if unk_id is not None else None,
                              fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


GGUF_TOKENIZER_MODELS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}

# Gemma 3's chat template (google/gemma-3-*-it; llama.cpp knows it by heart), for Gemma GGUF files
# that carry none, like the base gemma-3-270m.
GEMMA_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


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
