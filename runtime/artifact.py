"""The compiled artifact: a directory that holds everything serving needs, and nothing pickled.

    manifest.json          versions, target, model config, graph summary, kernel table, file hashes
                           and its own hash (runtime/manifest.py)
    weights.safetensors    weights already packed/transposed for the kernels; a quantized weight as
                           its `<name>.qweight` and `<name>.qscales` (kiln/quant.py)
    weights.rank<r>.safetensors  instead, when the model is sharded over `tensor_parallel` ranks:
                           rank r's shards of them (`Artifact.weights_file(rank)`); the programs,
                           graph.txt and the cache groups are then one rank's, the same for all
    graph.txt              the lowered IR, one graph per phase
    program.<phase>.py     the generated step program per phase ("mixed", "decode")
    kernels/*.py           generated Triton sources (GPU targets), readable
    binaries/*             compiled kernels (cubin or hsaco, + Triton's metadata) per kernel (GPU targets)
    cpu_kernels/*.so       the quantized-linear kernels, one library per ISA variant (cpu target)
    tokenizer.json, chat_template.jinja

`write_artifact` hashes every file into the manifest and the manifest into itself. `load_artifact`
refuses, with a message that says what to do (usually: recompile), an artifact whose format,
kiln or triton version does not match, or that was built against other runtime sources
(`runtime_source`: its programs and kernels call kiln.runtime, and nothing of the compiler);
whose manifest was edited (its own hash), has a missing or mistyped field, or disagrees with
itself; whose files do not match their hashes; or whose manifest disagrees with the files it
describes, whatever the hashes say:
  dtype,         the dtype of every tensor in each rank's weights file (its header only), but those
  quantized_weights  of quantized weights, which have their format's;
  block_size,    the KV states graph.txt declares (name, dtype, page shape) and those the
  cache groups   programs read (`states['k_cache.0']`);
  vocab_size     the columns of the logits graph.txt returns;
  target         the target the programs were generated for; on GPU targets, the kernel table
                 against kernels/ and binaries/ (one source and one binary per kernel, the
                 target's arch, the KV page size), on `cpu`, no kernels at all.
The GPU executor then refuses a GPU of another architecture than the kernels' (`check_device`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kiln import __version__
from kiln.errors import KilnError
from kiln.quant import QWEIGHT_SUFFIX, SCALES_SUFFIX, QuantFormat
from kiln.runtime.manifest import DIGEST_FIELD, FORMAT_VERSION, WEIGHT_DTYPES, Manifest, manifest_digest

MANIFEST = "manifest.json"
PHASES = ("mixed", "decode")
_HASHING = ThreadPoolExecutor(1, thread_name_prefix="kiln-artifact-hash")  # hashlib releases the GIL
LINK_BYTES = 1 << 20  # copy_artifact hard-links files of at least this size
TRITON_VERSION = importlib.metadata.version("triton")  # without importing triton


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def runtime_source() -> str:
    """The fingerprint (sha256, 16 hex digits) of the sources a served artifact runs against: the
    runtime package, and the contract, errors and process modules it imports. An artifact's
    programs and kernels call them (launcher, step_support, triton_device, cpu_ops), so an artifact
    built against other ones is stale even when the version string agrees."""
    root = Path(__file__).parent.parent
    shared = ("contract.py", "errors.py", "process.py", "quant.py")
    files = sorted((root / "runtime").glob("*.py")) + [root / name for name in shared]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def write_artifact(staging: Path, out: Path, fields: dict) -> Path:
    """Seals the files written under `staging` into the artifact `out`: hashes every file into the
    manifest's `files`, adds the versions and the manifest's own hash, checks that it parses as a
    `Manifest` (a compiler bug fails the compile, not the serve), writes manifest.json, then moves
    the directory into place (replacing an older artifact at `out`)."""
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = json.loads(json.dumps({  # as load_artifact will read it: tuples as lists, keys as strings
        **fields,
        "format": FORMAT_VERSION,
        "kiln_version": __version__,
        "runtime_source": runtime_source(),
        "triton_version": TRITON_VERSION,
        "files": {str(p.relative_to(staging)): sha256_file(p) for p in files},
    }))
    manifest[DIGEST_FIELD] = manifest_digest(manifest)
    Manifest.from_json(manifest, f"the manifest of {out}")
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return _move_into_place(staging, out)


def copy_artifact(source: Path, out: Path) -> Path:
    """A copy of the artifact `source` at `out` (replacing an older artifact there): its large files
    (the weights) hard-linked where the filesystem allows (instant, no second copy on disk), the
    rest copied. A linked file edited in place in either artifact fails both hash checks at load."""
    out = Path(out).absolute()
    if out == Path(source).absolute():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".kiln-staging-", dir=out.parent)) / "artifact"

    def link(src: str, dst: str) -> None:
        try:
            if os.path.getsize(src) < LINK_BYTES:
                raise OSError("small: copied")
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, staging, copy_function=link)
    return _move_into_place(staging, out)


def _move_into_place(staging: Path, out: Path) -> Path:
    """Moves the finished artifact directory `staging` to `out`, replacing an older artifact there."""
    if out.exists():
        if not (out / MANIFEST).exists():
            raise KilnError(f"{out} exists and is not a kiln artifact; choose another -o path or remove it")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(out))
    if staging.parent.name.startswith(".kiln-staging-"):
        staging.parent.rmdir()
    return out


@dataclass(frozen=True)
class Artifact:
    """A validated artifact directory and its manifest. `weights_check`: the weights' hash check
    still running in the background (load_artifact(..., weights_in_background=True)), if any."""

    path: Path
    manifest: Manifest
    weights_check: Future | None = field(default=None, compare=False, repr=False)

    def wait_verified(self) -> None:
        """Returns once every file has matched its hash; raises the KilnError of one that did not."""
        if self.weights_check is not None:
            self.weights_check.result()

    @property
    def target(self) -> str:
        return self.manifest.target

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def tensor_parallel(self) -> int:
        """The number of ranks the model is sharded over (1: not sharded)."""
        return self.manifest.tensor_parallel

    def weights_file(self, rank: int = 0) -> Path:
        """Rank `rank`'s weights (the only ones when `tensor_parallel` is 1)."""
        if not isinstance(rank, int) or not 0 <= rank < self.tensor_parallel:
            raise KilnError(f"artifact {self.path} holds the weights of {self.tensor_parallel} tensor-parallel rank(s), "
                            f"0 to {self.tensor_parallel - 1}, not of rank {rank!r}: run it with --tp "
                            f"{self.tensor_parallel}, or recompile it with `kiln compile --tp N` for another degree")
        return self.path / self.manifest.weight_files[rank]

    @property
    def arch(self) -> str | None:
        """The architecture its kernels were compiled for, as the kernel table records it ("sm_90a",
        "sm_80"; load_artifact checked that all agree); None without kernels (target cpu)."""
        return next((entry["arch"] for entry in (self.manifest.kernels or {}).values()), None)

    def check_device(self, found: str, name: str) -> None:
        """Refuses to run on the GPU `name` of architecture `found` ("sm_90" for compute capability
        9.0; "gfx942" for an AMD GPU) unless it is exactly the one the kernels were compiled for.

        A cubin for an arch-specific target (sm_90a, sm_100a: wgmma, TMA, tcgen05) runs only on that
        exact capability. A plain sm_XY cubin also loads on a later minor revision of the same major
        (sm_80 on 8.6 or 8.9), never on another major (artifacts hold no PTX for the driver to JIT). kiln
        still requires the exact capability for those: a target's tiles are sized for its card's
        shared memory and SM count (an sm_80 tile may need more shared memory than an 8.6 GPU has)."""
        arch = self.arch or "cpu"
        want = arch.removesuffix("a") if arch.startswith("sm_") else arch  # sm_90a is code for sm_90 only
        if found != want:
            raise KilnError(f"artifact {self.path} was compiled for {self.target} ({self.arch}), but this GPU "
                            f"({name}) is {found}: recompile with the --target of this GPU, or serve this artifact "
                            f"on {self.target} hardware")


def load_artifact(path: str | Path, *, check_hashes: bool = True, weights_in_background: bool = False) -> Artifact:
    """Opens and validates an artifact directory (see module docstring for what is checked).
    `check_hashes=False` skips hashing the files (the weights: seconds for a large model), for an
    artifact this process has just compiled or validated; every other check still runs.
    `weights_in_background=True` hashes every other file now (the programs are code: never run
    before their check) and the weights in a thread, while the caller loads them: it must call
    `wait_verified()` before serving anything (kiln.LLM does, once its executor is built)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise KilnError(f"{path} is not a kiln artifact (no {MANIFEST}); create one with `kiln compile <model> -o {path}`")
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KilnError(f"{manifest_path} is unreadable ({e}); recompile the artifact") from None
    if not isinstance(data, dict):
        raise KilnError(f"{manifest_path} is not a JSON object; recompile the artifact")
    _check_versions(path, data)
    if data.get(DIGEST_FIELD) != manifest_digest(data):
        raise KilnError(f"{manifest_path} was modified after compilation (its content does not match its "
                        f"{DIGEST_FIELD}): recompile the artifact rather than editing it")
    manifest = Manifest.from_json(data, str(manifest_path))
    weights_check = None
    if check_hashes:
        deferred = set(manifest.weight_files) if weights_in_background else set()
        _check_files(path, manifest, skip=deferred)
        if deferred:
            weights_check = _HASHING.submit(_check_hashes, path, {n: manifest.files[n] for n in deferred})
    _check_weights(path, manifest)
    _check_graph(path, manifest)
    _check_programs(path, manifest)
    return Artifact(path, manifest, weights_check)


def _check_versions(path: Path, manifest: dict) -> None:
    if manifest.get("format") != FORMAT_VERSION:
        raise KilnError(f"{path} uses artifact format {manifest.get('format')!r}, this kiln reads format "
                        f"{FORMAT_VERSION}: recompile it with this kiln")
    if manifest.get("kiln_version") != __version__:
        raise KilnError(f"{path} was compiled by kiln {manifest.get('kiln_version')}, this is kiln {__version__}: "
                        "recompile it with `kiln compile`")
    if manifest.get("runtime_source") != runtime_source():
        raise KilnError(f"{path} was compiled against other kiln runtime sources (fingerprint "
                        f"{manifest.get('runtime_source')}, this kiln's is {runtime_source()}): it is stale or foreign; "
                        "recompile it with this kiln (`kiln compile`)")
    if manifest.get("target") != "cpu" and manifest.get("triton_version") != TRITON_VERSION:
        raise KilnError(f"{path} holds kernels compiled by triton {manifest.get('triton_version')}, but triton "
                        f"{TRITON_VERSION} is installed: recompile, or install triton=={manifest.get('triton_version')}")


def _check_files(path: Path, manifest: Manifest, skip: set[str]) -> None:
    """Every file of the manifest present and, but for those in `skip`, matching its hash; no other file."""
    missing = [name for name in manifest.files if not (path / name).is_file()]
    if missing:
        raise KilnError(f"artifact {path} is incomplete: {missing[0]} is missing; recompile it")
    _check_hashes(path, {name: sha for name, sha in manifest.files.items() if name not in skip})
    extra = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()
                   and p.name != MANIFEST and str(p.relative_to(path)) not in manifest.files
                   and "__pycache__" not in p.parts)
    if extra:
        raise KilnError(f"artifact {path} holds files the compiler did not write ({', '.join(extra[:3])}); "
                        "remove them or recompile")


def _check_hashes(path: Path, files: dict[str, str]) -> None:
    for name, expected in files.items():
        if sha256_file(path / name) != expected:
            raise KilnError(f"artifact {path} was modified after compilation: {name} does not match its hash "
                            "in manifest.json; recompile it rather than editing it")


def _inconsistent(path: Path, what: str) -> KilnError:
    return KilnError(f"artifact {path} is inconsistent: {what}; manifest.json or the files were edited after "
                     "compilation: recompile the artifact rather than editing it")


def _read(path: Path, name: str) -> str:
    try:
        return (path / name).read_text()
    except OSError as e:
        raise KilnError(f"artifact {path} is incomplete: {name} is unreadable ({e}); recompile it") from None


def _check_weights(path: Path, manifest: Manifest) -> None:
    """Every tensor of each rank's weights file has the manifest's dtype (or, for a weight the
    compiler computed in another, e.g. fp32 `-exp(A_log)` in a bf16 model or a rank's i32
    vocabulary offset, the dtype graph.txt declares for it), but the two of each quantized weight,
    which have their format's (read from the headers only)."""
    declared = _PARAM_LINE.findall(_read(path, "graph.txt"))
    for file in manifest.weight_files:
        try:
            with safe_open(path / file, framework="pt") as weights:
                found = {name: weights.get_slice(name).get_dtype() for name in weights.keys()}
        except (OSError, SafetensorError) as e:
            raise KilnError(f"artifact {path}: {file} is unreadable ({e}); recompile it") from None
        for name, format_name in manifest.quantized_weights.items():
            format = QuantFormat.parse(format_name)
            _, qdtype, _, sdtype = format.storage(1, format.group)
            for suffix, dtype in ((QWEIGHT_SUFFIX, qdtype), (SCALES_SUFFIX, sdtype)):
                stored = found.pop(name + suffix, None)
                if stored != _SAFETENSORS_DTYPES[dtype]:
                    raise _inconsistent(path, f"manifest.json says weight {name} is {format_name}, but {file} "
                                              f"holds {name + suffix} as {stored or 'nothing'}")
        for name, dtype in declared:
            if dtype != manifest.dtype and found.get(name) == _SAFETENSORS_NAMES.get(dtype):
                del found[name]
        dtypes = set(found.values())
        if dtypes - {WEIGHT_DTYPES[manifest.dtype]}:
            raise _inconsistent(path, f"manifest.json says dtype {manifest.dtype}, but {file} holds "
                                      f"{', '.join(sorted(dtypes))} tensors")


_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16", torch.float32: "F32"}
_SAFETENSORS_NAMES = {**WEIGHT_DTYPES, "i32": "I32"}  # a param's IR dtype -> its safetensors dtype


# graph.txt, top level of each graph (ir/printer.py): "  &k_cache.0 = state : f32[NB, 16, 2, 16]" (a KV
# cache: NB blocks; a recurrent state: NS slots), "  %19 = fused(...) : f32[B, 49152]", "  return logits=%19"
# (a sharded graph's states print their `shard`: "  &k_cache.0 = state(shard=cut(dim=2, 2/2 of 2)) : ...")
_PARAM_LINE = re.compile(r"^  @(\S+) = param\S* : (\w+)\[", re.M)  # "  @name = param(derive=...) : f32[8]"
_STATE_LINE = re.compile(r"^  &(\S+) = state(?:\(.*?\))? : (\w+)\[N[BS], ([\d, ]+)\]$", re.M)
_NODE_TYPE_LINE = re.compile(r"^  (%\w+) = .* : \w+\[[^\]]*?(\d+)\]$", re.M)
_RETURN_LINE = re.compile(r"^  return logits=(%\w+)", re.M)


def _group_states(manifest: Manifest) -> set[tuple[str, str, tuple[int, ...]]]:
    """(state name, dtype, page or slot shape) of every state of the manifest's cache and state groups."""
    kv = {(name, group.dtype, page) for group in manifest.groups for name, page in zip(group.states, group.pages)}
    return kv | {(name, dtype, shape) for group in manifest.recurrent_groups
                 for name, shape, dtype in zip(group.states, group.shapes, group.dtypes)}


def _check_graph(path: Path, manifest: Manifest) -> None:
    """graph.txt declares exactly the cache and state groups' states (names, dtype, pages: so the
    block size, slot shapes) in every phase, and returns logits of `vocab_size` columns."""
    graphs = _read(path, "graph.txt").split("\ngraph ")
    want = _group_states(manifest)
    for text in graphs:
        name = text.removeprefix("graph ").split("(")[0]
        declared = {(n, dtype, tuple(int(d) for d in dims.split(", "))) for n, dtype, dims in _STATE_LINE.findall(text)}
        if declared != want:
            raise _inconsistent(path, f"{name} in graph.txt declares the states {_describe(declared - want)} "
                                      f"where the cache groups in manifest.json hold {_describe(want - declared)}")
        returned = _RETURN_LINE.search(text)
        columns = dict(_NODE_TYPE_LINE.findall(text)).get(returned.group(1)) if returned else None
        if columns != str(manifest.vocab_size):
            raise _inconsistent(path, f"manifest.json says vocab_size {manifest.vocab_size}, but {name} in graph.txt "
                                      f"returns logits of {columns} columns")


def _describe(states: set) -> str:
    return ", ".join(f"{name} {dtype}{list(page)}" for name, dtype, page in sorted(states)) or "none"


_PROGRAM_TARGET = re.compile(r"^TARGET = '(\w+)'", re.M)  # GPU programs; cpu programs have none
_STATE_READ = re.compile(r"states\['([^']+)'\]")


def _check_programs(path: Path, manifest: Manifest) -> None:
    """Each phase's program was generated for the manifest's target and reads exactly the cache
    and state groups' states; a GPU target's kernel table matches kernels/ and binaries/."""
    states = {name for name, _, _ in _group_states(manifest)}
    for phase in PHASES:
        program = _read(path, f"program.{phase}.py")
        declared = _PROGRAM_TARGET.search(program)
        generated_for = declared.group(1) if declared else "cpu"
        if generated_for != manifest.target:
            raise _inconsistent(path, f"manifest.json says target {manifest.target}, but program.{phase}.py was "
                                      f"generated for {generated_for}")
        read = set(_STATE_READ.findall(program))
        if read != states:
            raise _inconsistent(path, f"program.{phase}.py reads the states {sorted(read)}, but the cache and state "
                                      f"groups in manifest.json hold {sorted(states)}")
    _check_kernels(path, manifest)


def _check_kernels(path: Path, manifest: Manifest) -> None:
    target, table = manifest.target, manifest.kernels or {}
    is_gpu = target != "cpu"  # the serving half knows no target records: the kernel table names the arch
    archs = {entry.get("arch") for entry in table.values()}
    if len(archs) > 1 or archs & {None, "cpu"}:
        raise _inconsistent(path, f"the kernels of target {target} name the architectures {sorted(map(str, archs))}, "
                                  "not one GPU architecture")
    if is_gpu and not table:
        raise _inconsistent(path, f"manifest.json says target {target}, but has no kernel table")
    sources = {p.stem for p in (path / "kernels").glob("*.py")}
    binaries = {p.stem for p in (path / "binaries").glob("*") if p.suffix != ".json"}
    launch_data = {p.stem for p in (path / "binaries").glob("*.json")}
    if not is_gpu and (table or sources or binaries or launch_data):
        raise _inconsistent(path, "manifest.json says target cpu, but the artifact holds GPU kernels")
    missing = [name for name, entry in table.items() if not (path / "binaries" / f"{name}.{entry['binary']}").is_file()]
    if missing:
        raise _inconsistent(path, f"kernel {missing[0]}'s binary is missing from binaries/")
    for what, names in (("kernels/*.py", sources), ("binaries/*.<binary>", binaries), ("binaries/*.json", launch_data)):
        if names != set(table):
            raise _inconsistent(path, f"the kernel table in manifest.json and {what} differ in "
                                      f"{', '.join(sorted(names ^ set(table))[:2])}")
    for name, entry in table.items():
        page_size = entry.get("constexprs", {}).get("PAGE_SIZE", manifest.block_size)
        if page_size != manifest.block_size:
            raise _inconsistent(path, f"manifest.json says block_size {manifest.block_size}, but kernel {name} "
                                      f"reads pages of {page_size} tokens")
