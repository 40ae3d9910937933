"""The compiled artifact: a directory that holds everything serving needs, and nothing pickled.

    manifest.json          versions, target, model config, graph summary, kernel table, file hashes
    weights.safetensors    weights already packed/transposed for the kernels
    graph.txt              the lowered IR, one graph per phase
    program.<phase>.py     the generated step program per phase ("mixed", "decode")
    kernels/*.py           generated Triton sources (GPU targets), readable
    binaries/*             compiled kernels (cubin + metadata) per kernel (GPU targets)
    tokenizer.json, chat_template.jinja

`write_artifact` hashes every file into the manifest; `load_artifact` refuses an artifact whose
format, kiln or triton version, target, or any file's hash does not match, with a message
that says what to do (usually: recompile).
"""

from __future__ import annotations

import hashlib
import json
import importlib.metadata
import shutil
from dataclasses import dataclass
from pathlib import Path

from kiln import __version__
from kiln.errors import KilnError

FORMAT_VERSION = 2  # 2: cache groups replace the per-layer kv_cache list
MANIFEST = "manifest.json"
PHASES = ("mixed", "decode")
TRITON_VERSION = importlib.metadata.version("triton")  # without importing triton


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact(staging: Path, out: Path, manifest: dict) -> Path:
    """Seals the files written under `staging` into the artifact `out`: hashes every file into
    `manifest["files"]`, writes manifest.json, then moves the directory into place (replacing
    an older artifact at `out`)."""
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        **manifest,
        "format": FORMAT_VERSION,
        "kiln_version": __version__,
        "triton_version": TRITON_VERSION,
        "files": {str(p.relative_to(staging)): sha256_file(p) for p in files},
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if out.exists():
        if not (out / MANIFEST).exists():
            raise KilnError(f"{out} exists and is not a kiln artifact; choose another -o path or remove it")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(out))
    return out


@dataclass(frozen=True)
class Artifact:
    """A validated artifact directory and its manifest."""

    path: Path
    manifest: dict

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def file(self, name: str) -> Path:
        return self.path / name


def load_artifact(path: str | Path, *, check_hashes: bool = True) -> Artifact:
    """Opens and validates an artifact directory (see module docstring for what is checked)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise KilnError(f"{path} is not a kiln artifact (no {MANIFEST}); create one with `kiln compile <model> -o {path}`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KilnError(f"{manifest_path} is unreadable ({e}); recompile the artifact") from None
    _check_versions(path, manifest)
    if check_hashes:
        _check_files(path, manifest)
    return Artifact(path, manifest)


def _check_versions(path: Path, manifest: dict) -> None:
    if manifest.get("format") != FORMAT_VERSION:
        raise KilnError(f"{path} uses artifact format {manifest.get('format')!r}, this kiln reads format "
                        f"{FORMAT_VERSION}: recompile it with this kiln")
    if manifest.get("kiln_version") != __version__:
        raise KilnError(f"{path} was compiled by kiln {manifest.get('kiln_version')}, this is kiln {__version__}: "
                        "recompile it with `kiln compile`")
    if manifest.get("target") != "cpu" and manifest.get("triton_version") != TRITON_VERSION:
        raise KilnError(f"{path} holds kernels compiled by triton {manifest.get('triton_version')}, but triton "
                        f"{TRITON_VERSION} is installed: recompile, or install triton=={manifest.get('triton_version')}")


def _check_files(path: Path, manifest: dict) -> None:
    files = manifest.get("files") or {}
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise KilnError(f"artifact {path} is incomplete: {name} is missing; recompile it")
        if sha256_file(file) != expected:
            raise KilnError(f"artifact {path} was modified after compilation: {name} does not match its hash "
                            "in manifest.json; recompile it rather than editing it")
    extra = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()
                   and p.name != MANIFEST and str(p.relative_to(path)) not in files and "__pycache__" not in p.parts)
    if extra:
        raise KilnError(f"artifact {path} holds files the compiler did not write ({', '.join(extra[:3])}); "
                        "remove them or recompile")
