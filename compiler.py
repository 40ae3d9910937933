"""`kiln compile`: model -> artifact. Traces the spec, runs the pass pipeline per phase, renders
and compiles each phase's step program for the target, and writes the artifact (runtime/artifact.py).

This is part of the thin top-level facade: the only place where the compiler half
(frontend, passes, codegen) meets the serving half's artifact format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch

from kiln import __version__
from kiln.codegen.aot import CompiledKernel, resource_table
from kiln.codegen.cpu import lay_out_weights, render_cpu_program
from kiln.codegen.targets import get_target
from kiln.errors import KilnError
from kiln.frontend.checkpoint import load_checkpoint, resolve_model_path
from kiln.frontend.trace import StepConfig, trace
from kiln.frontend.weights import load_weights
from kiln.ir import DTYPES, Graph, op_counts, print_graph
from kiln.ir.cache_groups import plan_cache_groups
from kiln.models import build_spec
from kiln.passes import PipelineOptions, PipelineReport, materialize_weights, run_pipeline
from kiln.passes.assign_cache_groups import assign_cache_groups
from kiln.runtime.artifact import PHASES, TRITON_VERSION, copy_artifact, load_artifact, write_artifact
from kiln.runtime.kv_groups import GroupPolicy

if TYPE_CHECKING:
    from kiln.codegen.gpu_program import GpuProgram

log = logging.getLogger("kiln.compile")


@dataclass(frozen=True)
class CompileOptions:
    target: str = "cpu"
    dtype: str | None = None  # None: f32 on the cpu target, bf16 on GPUs
    block_size: int = 16
    dump_ir: Path | None = None

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
    kernel_lines: list[str] = field(default_factory=list)  # GPU targets: kernel summary and resource table

    def lines(self) -> list[str]:
        head = "reused from the compile cache" if self.cached else f"compiled in {self.seconds:.1f} s"
        out = [f"artifact {self.artifact} for target {self.target}: {head}"]
        for phase, info in self.phases.items():
            out.append(f"  {phase:6}: {info['launches']} launches per step, {info['launches_per_layer']:.1f} per decoder "
                       f"layer ({info['launches_per_layer_before_fusion']:.1f} before fusion); peak activations "
                       f"{info['peak_activation_bytes']} bytes")
        return out + self.kernel_lines


def _phase_info(graph: Graph, report: PipelineReport, phase: str) -> dict:
    (before, after), (steps_before, steps_after) = report.launches_per_layer(phase), report.launches(phase)
    return {"nodes": len(graph.nodes), "ops": op_counts(graph), "launches": steps_after,
            "launches_before_fusion": steps_before, "launches_per_layer": after,
            "launches_per_layer_before_fusion": before,
            "peak_activation_bytes": str(report.peak_activation_bytes[phase])}


def compile_model(model: str, out: str | Path, options: CompileOptions = CompileOptions(), *,
                  progress: bool = True) -> CompileSummary:
    """Compiles `model` (built-in name, HF directory or .gguf) into the artifact directory `out`."""
    start = time.perf_counter()
    target = get_target(options.target)
    dtype = options.resolved_dtype
    if dtype not in ("f32", "bf16", "f16"):
        raise KilnError(f"--dtype {dtype!r} is not supported; use f32, bf16 or f16")
    ckpt = load_checkpoint(model, progress=False)  # load_weights below shows the progress
    spec = build_spec(ckpt.config)
    log.info("tracing %s", type(spec).__name__)
    graph = trace(spec, StepConfig(dtype=dtype, block_size=options.block_size))
    cache_groups = plan_cache_groups(graph, spec.config.max_position_embeddings)
    graph = assign_cache_groups(graph, cache_groups)
    check = None
    if target.is_gpu:  # imported here: importing triton decides compiled vs interpreted (TRITON_INTERPRET)
        from kiln.codegen.gpu_program import build_gpu_program
        from kiln.codegen.kernel_check import kernel_check

        check = kernel_check(target)
    log.info("running the pass pipeline")
    phases, report = run_pipeline(graph, PipelineOptions(phases=PHASES, dump_dir=options.dump_ir, kernel_check=check))
    program, compiling = None, None
    if target.is_gpu:
        program = build_gpu_program(phases, target)
        compiling = program.start_compile()  # in other processes, while the weights load
    weights = load_weights(spec, spec.WEIGHTS, ckpt.tensors, DTYPES[dtype], progress=progress)
    packed = {name: w for g in phases.values() for name, w in materialize_weights(g, weights).items()}
    if not target.is_gpu:
        packed = lay_out_weights(phases.values(), packed)
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=".kiln-staging-", dir=out.parent if out.parent.exists() else None))
    safetensors.torch.save_file(packed, staging / "weights.safetensors")
    (staging / "graph.txt").write_text("\n".join(print_graph(g) for g in phases.values()))
    kernels, kernel_lines = {}, []
    if program:
        kernels, kernel_lines = _write_gpu_program(program, *compiling.result(), staging)
    else:
        for phase, g in phases.items():
            (staging / f"program.{phase}.py").write_text(render_cpu_program(g))
    if ckpt.tokenizer is not None:
        (staging / "tokenizer.json").write_text(ckpt.tokenizer.to_str())
    if ckpt.chat_template:
        (staging / "chat_template.jinja").write_text(ckpt.chat_template)
    summary = CompileSummary(out, target.name, 0.0, {p: _phase_info(g, report, p) for p, g in phases.items()},
                             kernel_lines=kernel_lines)
    write_artifact(staging, out, {
        "target": target.name,
        "dtype": dtype,
        "block_size": options.block_size,
        "model": {"source": model, "architecture": ckpt.config["architectures"][0], "config": ckpt.config},
        "vocab_size": spec.config.vocab_size,
        "max_model_len": spec.config.max_position_embeddings,
        "cache_groups": [{**group.to_json(), "blocks_per_sequence": GroupPolicy(group).blocks_held(
            spec.config.max_position_embeddings - 1, spec.config.max_position_embeddings)} for group in cache_groups],
        "tokenizer": {
            "file": "tokenizer.json" if ckpt.tokenizer is not None else None,
            "chat_template": "chat_template.jinja" if ckpt.chat_template else None,
            "bos_token_id": ckpt.bos_token_id,
            "eos_token_ids": list(ckpt.eos_token_ids),
        },
        "generation_config": ckpt.generation_config,
        "graph": summary.phases,
        **({"kernels": kernels} if program else {}),
    })
    summary.seconds = time.perf_counter() - start
    return summary


def _write_gpu_program(program: GpuProgram, compiled: list[CompiledKernel], seconds: float,
                       staging: Path) -> tuple[dict[str, dict], list[str]]:
    """GPU targets: writes the kernels (kernels/<name>.py), step programs (program.<phase>.py) and
    binaries (binaries/<name>.cubin or .hsaco, binaries/<name>.json: Triton's launch metadata). Returns the
    manifest's kernel table (what the launcher needs, and each kernel's resource usage) and the
    summary lines (kernel count, compile seconds, spills, resource table)."""
    program.write(staging)
    table = program.kernel_table()
    (staging / "binaries").mkdir()
    for kernel in compiled:
        (staging / "binaries" / f"{kernel.name}.{kernel.binary_ext}").write_bytes(kernel.binary)
        (staging / "binaries" / f"{kernel.name}.json").write_text(json.dumps(kernel.metadata))
        # pairs, not a dict: the manifest is written with sorted keys, and the order is the kernel's
        table[kernel.name].update(compiled_signature=list(kernel.signature.items()), arch=kernel.arch,
                                  binary=kernel.binary_ext,
                                  resources=asdict(kernel.resources))
    spilling = [kernel.name for kernel in compiled if kernel.resources.spills]
    if spilling:
        log.warning("kernels that spill registers: %s", ", ".join(spilling))
    lines = [f"  kernels: {len(compiled)} for {program.target.arch_name}, compiled in {seconds:.1f} s (beside the "
             f"weight loading), {len(spilling)} with register spills"]
    return table, lines + ["    " + row for row in resource_table(compiled).splitlines()]


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
    root = Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln") / "artifacts"
    key = compile_cache_key(model, options)
    cached, kernel_lines = root / key, root / f"{key}.kernels.json"  # the summary's kernel lines, beside it
    summary = None
    if (cached / "manifest.json").exists():
        try:
            artifact = load_artifact(cached, check_hashes=check_hashes)
            lines = json.loads(kernel_lines.read_text()) if kernel_lines.is_file() else []
            summary = CompileSummary(cached, artifact.target, 0.0, artifact.manifest.graph, cached=True,
                                     kernel_lines=lines)
        except KilnError as e:
            log.warning("recompiling: the cached artifact is unusable (%s)", e)
    if summary is None:
        root.mkdir(parents=True, exist_ok=True)
        summary = compile_model(model, cached, options, progress=progress)
        kernel_lines.write_text(json.dumps(summary.kernel_lines))
    if out is not None:
        summary.artifact = copy_artifact(cached, Path(out))
    summary.seconds = time.perf_counter() - start
    return summary
