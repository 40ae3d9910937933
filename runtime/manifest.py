"""manifest.json as a typed, versioned record: what `kiln compile` states about an artifact.

`Manifest.from_json` parses the JSON and refuses, with a KilnError that says to recompile, any
missing or mistyped field and any disagreement inside the manifest (the cache groups' block
size, pages and dtype against the artifact's). The manifest seals itself: `manifest_sha256` is
the sha256 of its canonical JSON without that field (`manifest_digest`), written by the compiler
and checked at load, so an edited field is refused even when it looks consistent.
runtime/artifact.py checks the fields that change meaning against the files they describe.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import NoReturn

from kiln.contract import RECURRENT_STATE, CacheGroup, StateGroup
from kiln.errors import KilnError
from kiln.quant import QuantFormat

FORMAT_VERSION = 7  # 2: cache groups replace the per-layer kv_cache list; 3: manifest_sha256, validated fields;
# 4: cpu programs list PACKED_EXPERTS (mixtures of experts); 5: runtime_source, self-contained GPU programs
# (step_support.Kernel records, kernels importing kiln.runtime.triton_device), kernel entries name their binary;
# 6: quantized weights (`quantized_weights`, kiln/quant.py) and the cpu target's compiled C kernels (`cpu_kernels`);
# 7: tensor parallelism: `tensor_parallel` ranks, one weights file per rank beyond one (`weights_file_name`), step
# programs take the rank's communicator (`step(..., comm=None)`, kiln/runtime/collectives.py)
DIGEST_FIELD = "manifest_sha256"
BINARY_KINDS = ("cubin", "hsaco")  # a kernel's binaries/<name>.<kind>: CUDA or ROCm
QUANT_ACTIVATIONS = ("fp32", "int16", "int8")
WEIGHT_DTYPES = {"f32": "F32", "bf16": "BF16", "f16": "F16"}  # an artifact's dtype -> its weights' safetensors dtype


def weights_file_name(rank: int, tensor_parallel: int) -> str:
    """The artifact's file of rank `rank`'s weights: weights.safetensors when one rank runs the
    model, else weights.rank<rank>.safetensors (each rank's shards, passes/shard_specs.py)."""
    return "weights.safetensors" if tensor_parallel == 1 else f"weights.rank{rank}.safetensors"


def manifest_digest(data: dict) -> str:
    """The sha256 of the manifest's canonical JSON (sorted keys, no spaces) without DIGEST_FIELD."""
    canonical = json.dumps({k: v for k, v in data.items() if k != DIGEST_FIELD}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    source: str  # what was compiled: a built-in name, an HF directory or a .gguf file
    architecture: str  # the HF `architectures` name
    config: dict  # the HF config.json


@dataclass(frozen=True)
class TokenizerInfo:
    file: str | None  # "tokenizer.json", or None for a model without one
    chat_template: str | None  # "chat_template.jinja", or None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest.json. `cache_groups` stay the JSON entries (they also record
    `bytes_per_token` and `blocks_per_sequence`); `groups` types them. `kernels` (the kernel
    table: launch signature, constexprs, arch and resources per kernel) is None on `cpu`. With
    `tensor_parallel` > 1 every rank runs the same programs on its own weights file
    (`weight_files`), and the graph summary, cache and state groups are one rank's.
    `manifest["field"]` reads a field as its JSON value, for callers that treat it as a dict."""

    format: int
    kiln_version: str
    runtime_source: str  # the fingerprint of the runtime sources its programs run against (artifact.RUNTIME_SOURCE)
    triton_version: str
    target: str
    dtype: str
    block_size: int
    model: ModelInfo
    vocab_size: int
    max_model_len: int
    cache_groups: tuple[dict, ...]
    tokenizer: TokenizerInfo
    generation_config: dict
    graph: dict  # per phase: nodes, op counts, launches, peak activation bytes
    files: dict  # relative path -> sha256 of every file but manifest.json
    manifest_sha256: str
    tensor_parallel: int  # ranks the model is sharded over (1: not sharded)
    kernels: dict | None = None
    quantized_weights: dict = field(default_factory=dict)  # weight name -> kiln.quant format name
    cpu_kernels: dict | None = None  # cpu target: library ("quant", "step_ops") -> ISA variant -> its file
    quant_activations: str = "fp32"  # cpu target: what its quantized linears multiply at one row of x (cpu_quant)
    state_groups: tuple[dict, ...] = ()  # the recurrent layers' state pool (contract.StateGroup entries)

    @property
    def weight_files(self) -> tuple[str, ...]:
        """Each rank's weights file, in rank order."""
        return tuple(weights_file_name(rank, self.tensor_parallel) for rank in range(self.tensor_parallel))

    @property
    def groups(self) -> tuple[CacheGroup, ...]:
        return tuple(CacheGroup.from_json(group) for group in self.cache_groups)

    @property
    def recurrent_groups(self) -> tuple[StateGroup, ...]:
        return tuple(StateGroup.from_json(group) for group in self.state_groups)

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        value = getattr(self, key)
        return asdict(value) if isinstance(value, (ModelInfo, TokenizerInfo)) else value

    @classmethod
    def from_json(cls, data: dict, where: str) -> Manifest:
        """The manifest of the JSON object `data`; KilnErrors name `where` (the file)."""
        if not isinstance(data, dict):
            raise KilnError(f"{where} is not a JSON object; recompile the artifact")
        field = _Fields(data, where)
        model = _Fields(field("model", dict), f"{where} (model)")
        tokenizer = _Fields(field("tokenizer", dict), f"{where} (tokenizer)")
        manifest = cls(
            format=field("format", int), kiln_version=field("kiln_version", str),
            runtime_source=field("runtime_source", str),
            triton_version=field("triton_version", str), target=field("target", str), dtype=field("dtype", str),
            block_size=field("block_size", int),
            model=ModelInfo(model("source", str), model("architecture", str), model("config", dict)),
            vocab_size=field("vocab_size", int), max_model_len=field("max_model_len", int),
            cache_groups=tuple(field("cache_groups", list)),
            tokenizer=TokenizerInfo(tokenizer("file", str, None), tokenizer("chat_template", str, None),
                                    tokenizer("bos_token_id", int, None), tuple(tokenizer("eos_token_ids", list))),
            generation_config=field("generation_config", dict), graph=field("graph", dict),
            files=field("files", dict), manifest_sha256=field(DIGEST_FIELD, str),
            tensor_parallel=field("tensor_parallel", int), kernels=field("kernels", dict, None),
            quantized_weights=field("quantized_weights", dict), cpu_kernels=field("cpu_kernels", dict, None),
            quant_activations=field("quant_activations", str, None) or "fp32",
            state_groups=tuple(field("state_groups", list, None) or ()))
        manifest._check(where)
        return manifest

    def _check(self, where: str) -> None:
        """Refuses values no compiler writes and fields that disagree with each other."""
        def refuse(what: str) -> NoReturn:
            raise KilnError(f"{where}: {what}; recompile the artifact rather than editing it")

        if not isinstance(self.target, str) or not self.target.isidentifier():
            refuse(f"target {self.target!r} is not a target name")
        if self.dtype not in WEIGHT_DTYPES:
            refuse(f"dtype {self.dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        for name in ("block_size", "vocab_size", "max_model_len", "tensor_parallel"):
            if getattr(self, name) < 1:
                refuse(f"{name} is {getattr(self, name)}, not a positive count")
        if not all(isinstance(i, int) for i in self.tokenizer.eos_token_ids):
            refuse(f"eos_token_ids {list(self.tokenizer.eos_token_ids)} are not all token ids")
        for name, sha in self.files.items():
            if not isinstance(sha, str) or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                refuse(f"files lists {name!r}, which is not a file of the artifact with its sha256")
        if not all(isinstance(entry, dict) for entry in (self.kernels or {}).values()):
            refuse("the kernel table has entries that are not objects")
        for name, entry in (self.kernels or {}).items():
            if entry.get("binary") not in BINARY_KINDS:
                refuse(f"kernel {name} names its binary {entry.get('binary')!r}, not one of {', '.join(BINARY_KINDS)}")
        for name, format in self.quantized_weights.items():
            try:
                QuantFormat.parse(format)
            except KilnError:
                refuse(f"weight {name} is quantized as {format!r}, which names no format kiln knows")
        if self.quant_activations not in QUANT_ACTIVATIONS:
            refuse(f"quant_activations is {self.quant_activations!r}, not one of {', '.join(QUANT_ACTIVATIONS)}")
        for library, variants in (self.cpu_kernels or {}).items():
            for variant, file in (variants.items() if isinstance(variants, dict) else [(None, variants)]):
                if file not in self.files:
                    refuse(f"the cpu kernels {library} for {variant} are {file!r}, which the artifact does not hold")
        missing = [name for name in self.weight_files if name not in self.files]
        if missing:
            refuse(f"tensor_parallel is {self.tensor_parallel}, but the artifact does not hold {missing[0]}")
        for named in (self.tokenizer.file, self.tokenizer.chat_template):
            if named is not None and named not in self.files:
                refuse(f"the tokenizer names {named!r}, which the artifact does not hold")
        if not self.cache_groups and not self.state_groups:
            refuse("there are no cache groups and no state groups")
        try:
            groups = self.groups
        except (KeyError, TypeError, ValueError) as e:
            refuse(f"a cache group is malformed ({type(e).__name__}: {e})")
        try:
            recurrent = self.recurrent_groups
        except (KeyError, TypeError, ValueError) as e:
            refuse(f"a state group is malformed ({type(e).__name__}: {e})")
        for group in recurrent:
            if group.kind != RECURRENT_STATE or not len(group.states) == len(group.shapes) == len(group.dtypes) \
                    or not set(group.dtypes) <= set(WEIGHT_DTYPES):
                refuse(f"state group {group.to_json()} is not a recurrent-state group with a shape and dtype per state")
        for index, group in enumerate(groups):
            if group.block_size != self.block_size or any(page[0] != self.block_size for page in group.pages):
                refuse(f"block_size is {self.block_size}, but cache group {index} has blocks of {group.block_size} "
                       f"tokens and pages {[list(p) for p in group.pages]}")
            if group.dtype != self.dtype:
                refuse(f"dtype is {self.dtype}, but cache group {index} holds {group.dtype}")
            if len(group.pages) != len(group.states):
                refuse(f"cache group {index} has {len(group.states)} states but {len(group.pages)} pages")


_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer", type(None): "null"}


class _Fields:
    """Reads a JSON object's fields, each checked to be of the kinds asked (`None` for null)."""

    def __init__(self, data: dict, where: str):
        self.data, self.where = data, where

    def __call__(self, key: str, *kinds):
        kinds = tuple(type(None) if kind is None else kind for kind in kinds)
        value = self.data.get(key)
        if key not in self.data and type(None) not in kinds:
            raise KilnError(f"{self.where} has no {key!r}; recompile the artifact")
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise KilnError(f"{self.where}: {key!r} is {value!r}, not {' or '.join(_JSON_NAMES[k] for k in kinds)}; "
                            "recompile the artifact")
        return value
