"""The compile cache: `kiln compile`'s artifacts reused for unchanged inputs, and the options and
summary of a compile. Light to import (no frontend, passes or codegen beyond the target records):
a cache hit, what a warm `kiln serve MODEL` or `kiln.LLM(MODEL)` takes, never loads the compiler;
a miss calls kiln.compiler.compile_model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kiln import __version__
from kiln.codegen.targets import get_target
from kiln.errors import KilnError
from kiln.frontend.checkpoint import resolve_model_path
from kiln.process import cache_dir
from kiln.runtime.artifact import TRITON_VERSION, copy_artifact, load_artifact

log = logging.getLogger("kiln.compile")


@dataclass(frozen=True)
class CompileOptions:
    target: str = "cpu"
    dtype: str | None = None  # None: f32 on the cpu target, bf16 on GPUs
    block_size: int = 16
    dump_ir: Path | None = None
    quant: str | None = None  # `--quant int8|int4|fp8`: quantize the floating-point linear weights
    dequantize: bool = False  # `--dequantize`: also the weights the checkpoint stores quantized
    # `--quant-activations`: at one row of x (batch-1 decode) the cpu target's quantized linears
    # multiply by activations quantized per block of 32 to int16 (relative error ~2e-5) or int8
    # (llama.cpp's scheme), or by fp32 ones (exact dequantize-then-matmul, as at every other row count)
    quant_activations: str = "int16"
    tp: int = 1  # `--tp`: tensor-parallel degree (passes/shard.py)

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("f32" if self.target == "cpu" else "bf16")


@dataclass
class CompileSummary:
    artifact: Path
    target: str
    seconds: float
    phases: dict[str, dict] = field(default_factory=dict)
    cached: bool = False
    detail_lines: list[str] = field(default_factory=list)  # quantized weights; GPU targets: kernels, resources

    def lines(self) -> list[str]:
        head = "reused from the compile cache" if self.cached else f"compiled in {self.seconds:.1f} s"
        out = [f"artifact {self.artifact} for target {self.target}: {head}"]
        for phase, info in self.phases.items():
            out.append(f"  {phase:6}: {info['launches']} launches per step, {info['launches_per_layer']:.1f} per decoder "
                       f"layer ({info['launches_per_layer_before_fusion']:.1f} before fusion); peak activations "
                       f"{info['peak_activation_bytes']} bytes")
        return out + self.detail_lines


def _source_fingerprint() -> str:
    """A hash of kiln's own source (compiler and the runtime helpers generated programs call), so
    a changed compiler never reuses an artifact built by an older one."""
    root = Path(__file__).parent
    files = sorted(root.glob("*.py")) + sorted(root.glob("codegen/templates/*.j2"))
    for layer in ("ir", "frontend", "passes", "codegen", "runtime", "models"):
        files += sorted((root / layer).rglob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def _target_module_digest(name: str) -> str:
    """The sha256 of the target's module file: one found through KILN_TARGETS_PATH is not part of
    kiln's source, and its tiles decide the kernels all the same."""
    module = sys.modules[f"kiln.codegen.targets.{get_target(name).name}"]
    return hashlib.sha256(Path(str(module.__file__)).read_bytes()).hexdigest()


def compile_cache_key(model: str, options: CompileOptions) -> str:
    """Identifies a compile: kiln's version and source, triton's version, the options, the target's
    module (it may live outside kiln), and the model's files (path, size, modification time)."""
    path = resolve_model_path(model)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    identity = {
        "kiln": __version__,
        "source": _source_fingerprint(),
        "triton": TRITON_VERSION,
        "options": {**asdict(options), "dump_ir": None},
        "target_module": _target_module_digest(options.target),
        "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def compile_cached(model: str, options: CompileOptions = CompileOptions(), *, out: str | Path | None = None,
                   progress: bool = True, check_hashes: bool = True) -> CompileSummary:
    """`compile_model` through the compile cache ($KILN_CACHE_DIR/artifacts, else
    ~/.cache/kiln/artifacts): a warm call returns the existing artifact after validating it (every
    file's hash). With `out`, the artifact is then copied there (hard links where possible):
    `kiln compile -o DIR` of unchanged inputs reuses the cache too. `check_hashes=False` leaves a
    hit's file hashes to the caller. `options.dump_ir` needs a real compile: use `compile_model`."""
    start = time.perf_counter()
    root = cache_dir("artifacts")
    key = compile_cache_key(model, options)
    cached, details = root / key, root / f"{key}.details.json"  # the summary's detail lines, beside it
    summary = None
    if (cached / "manifest.json").exists():
        try:
            artifact = load_artifact(cached, check_hashes=check_hashes)
            lines = json.loads(details.read_text()) if details.is_file() else []
            summary = CompileSummary(cached, artifact.target, 0.0, artifact.manifest.graph, cached=True,
                                     detail_lines=lines)
        except KilnError as e:
            log.warning("recompiling: the cached artifact is unusable (%s)", e)
    if summary is None:
        from kiln.compiler import compile_model  # the compiler only on a miss

        root.mkdir(parents=True, exist_ok=True)
        summary = compile_model(model, cached, options, progress=progress)
        details.write_text(json.dumps(summary.detail_lines))
    if out is not None:
        summary.artifact = copy_artifact(cached, Path(out))
    summary.seconds = time.perf_counter() - start
    return summary
