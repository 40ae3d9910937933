"""`kiln compile`: model -> artifact. Traces the spec, runs the pass pipeline per phase, renders
and compiles each phase's step program for the target, and writes the artifact (runtime/artifact.py).
With `tp` > 1 (`--tp N`) the traced graph is first sharded (passes/shard.py): the pipeline and the
programs are one rank's, the same for every rank, and each rank's weights go to a file of its own.

This is part of the thin top-level facade: the only place where the compiler half
(frontend, passes, codegen) meets the serving half's artifact format.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch

from kiln.codegen.aot import CompiledKernel, resource_table
from kiln.codegen.cpu import lay_out_weights, render_cpu_program
from kiln.codegen.cpu_kernels import build_quant_library
from kiln.codegen.cpu_step_kernels import build_step_library
from kiln.codegen.targets import Target, fp8_targets, get_target
from kiln.compile_cache import CompileOptions, CompileSummary, compile_cache_key, compile_cached
from kiln.errors import KilnError
from kiln.frontend.checkpoint import load_checkpoint
from kiln.frontend.checkpoint_types import Checkpoint
from kiln.frontend.tracer import StepConfig, trace
from kiln.frontend.weights import load_weights, stored_formats
from kiln.ir import DTYPES, Graph, op_counts, print_graph
from kiln.ir.cache_groups import plan_cache_groups, plan_state_groups
from kiln.models import build_spec
from kiln.passes import PipelineOptions, PipelineReport, materialize_weights, run_pipeline, shard, shard_weights
from kiln.passes.assign_cache_groups import assign_cache_groups
from kiln.passes.context import PassContext
from kiln.passes.quantize_weights import quantize_weights
from kiln.quant import QuantFormat, QuantizedTensor, Weight, quantize, stored_tensors
from kiln.runtime.artifact import PHASES, write_artifact
from kiln.runtime.kv_groups import GroupPolicy
from kiln.runtime.manifest import weights_file_name

if TYPE_CHECKING:
    from kiln.codegen.gpu_program import GpuProgram

log = logging.getLogger("kiln.compile")


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
    graph, stored = _quantize(graph, spec, ckpt, target, options)
    graph = shard(graph, options.tp)  # one rank's graph (tp 1: the same)
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
    weights = load_weights(spec, spec.WEIGHTS, ckpt.tensors, DTYPES[dtype], progress=progress,
                           quantized=ckpt.quantized, keep=stored)
    formats = {p.name: p.attrs["quant"] for p in graph.params if "quant" in p.attrs}
    weights.update({name: quantize(weights[name], fmt) for name, fmt in formats.items() if name not in stored})
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=".kiln-staging-", dir=out.parent if out.parent.exists() else None))
    packed = _write_weights(graph, phases, weights, target, options.tp, staging)
    quantized = {name: str(w.format) for name, w in packed.items() if isinstance(w, QuantizedTensor)}
    cpu_kernels = None if target.is_gpu else _build_cpu_kernels({QuantFormat.parse(f) for f in quantized.values()},
                                                                 staging / "cpu_kernels")
    (staging / "graph.txt").write_text("\n".join(print_graph(g) for g in phases.values()))
    kernels, detail_lines = {}, []
    if program:
        kernels, detail_lines = _write_gpu_program(program, *compiling.result(), staging)
    else:
        for phase, g in phases.items():
            (staging / f"program.{phase}.py").write_text(render_cpu_program(g))
    if ckpt.tokenizer is not None:
        (staging / "tokenizer.json").write_text(ckpt.tokenizer.to_str())
    if ckpt.chat_template:
        (staging / "chat_template.jinja").write_text(ckpt.chat_template)
    summary = CompileSummary(out, target.name, 0.0, {p: _phase_info(g, report, p) for p, g in phases.items()},
                             detail_lines=_weight_lines(packed) + _rank_lines(options.tp, staging) + detail_lines)
    write_artifact(staging, out, {
        "target": target.name,
        "dtype": dtype,
        "block_size": options.block_size,
        "tensor_parallel": options.tp,
        "model": {"source": model, "architecture": ckpt.config["architectures"][0], "config": ckpt.config},
        "vocab_size": spec.config.vocab_size,
        "max_model_len": spec.config.max_position_embeddings,
        "cache_groups": [{**group.to_json(), "blocks_per_sequence": GroupPolicy(group).blocks_held(
            spec.config.max_position_embeddings - 1, spec.config.max_position_embeddings)} for group in cache_groups],
        "state_groups": [group.to_json() for group in plan_state_groups(graph)],
        "tokenizer": {
            "file": "tokenizer.json" if ckpt.tokenizer is not None else None,
            "chat_template": "chat_template.jinja" if ckpt.chat_template else None,
            "bos_token_id": ckpt.bos_token_id,
            "eos_token_ids": list(ckpt.eos_token_ids),
        },
        "generation_config": ckpt.generation_config,
        "graph": summary.phases,
        "quantized_weights": quantized,
        **({"kernels": kernels} if program else {}),
        **({"cpu_kernels": cpu_kernels} if cpu_kernels else {}),
        **({"quant_activations": options.quant_activations} if quantized and not target.is_gpu else {}),
    })
    summary.seconds = time.perf_counter() - start
    return summary


def _write_weights(graph: Graph, phases: dict[str, Graph], weights: dict[str, Weight], target: Target, tp: int,
                   staging: Path) -> dict[str, Weight]:
    """Writes each of the `tp` ranks' weights file (runtime/manifest.weights_file_name): the
    phases' params computed from the rank's shards of `weights` (shard_weights of the sharded
    traced `graph`; tp 1: all of them), laid out as the target's programs read them. One rank's
    at a time, so that beside the checkpoint's weights only one rank's are held. Returns rank
    0's, as the kernels read them (quantized weights as QuantizedTensors)."""
    first: dict[str, Weight] = {}
    for rank in range(tp):
        ranked = shard_weights(graph, weights, rank) if tp > 1 else weights
        packed = {name: w for g in phases.values() for name, w in materialize_weights(g, ranked).items()}
        if rank == 0:
            first = packed
        if not target.is_gpu:
            packed = lay_out_weights(phases.values(), packed)
        safetensors.torch.save_file(stored_tensors(packed), staging / weights_file_name(rank, tp))
    return first


def _rank_lines(tp: int, staging: Path) -> list[str]:
    """The summary's line on a tensor-parallel artifact: its ranks and their weights files."""
    if tp == 1:
        return []
    sizes = [(staging / weights_file_name(rank, tp)).stat().st_size for rank in range(tp)]
    return [f"  tensor parallel: {tp} ranks, each running the same programs on its own weights file "
            f"({weights_file_name(0, tp)} .. {weights_file_name(tp - 1, tp)}, {max(sizes) / 1e6:.1f} MB at most)"]


def _build_cpu_kernels(formats: set[QuantFormat], out_dir: Path) -> dict[str, dict[str, str]]:
    """The cpu target's C kernels, built into `out_dir` (`cpu_kernels/` of the artifact): the step
    ops always, the quantized linears of `formats` if any. Returns the manifest's `cpu_kernels`."""
    libraries = {"step_ops": build_step_library(out_dir)}
    if formats:
        libraries["quant"] = build_quant_library(formats, out_dir)
    return {name: {variant: f"{out_dir.name}/{file}" for variant, file in files.items()}
            for name, files in libraries.items()}


def _weight_lines(weights: dict) -> list[str]:
    """The summary's line on quantized weights: how many, in which formats, bytes stored."""
    quantized = [w for w in weights.values() if isinstance(w, QuantizedTensor)]
    if not quantized:
        return []
    formats = sorted({str(w.format) for w in quantized})
    total = sum(w.nbytes for w in weights.values())
    return [f"  weights: {len(quantized)} of {len(weights)} quantized ({', '.join(formats)}), "
            f"{total / 1e6:.1f} MB stored"]


def _quantize(graph: Graph, spec, ckpt: Checkpoint, target: Target, options: CompileOptions) -> tuple[Graph, dict]:
    """`graph` with the weights that stay quantized marked (passes/quantize_weights.py): those the
    checkpoint stores in a format kiln keeps (unless --dequantize), then --quant's. Returns it and
    the spec params read quantized from the checkpoint (name -> format)."""
    stored = {} if options.dequantize else stored_formats(spec, spec.WEIGHTS, ckpt.quant_formats)
    if options.quant == "fp8" and target.is_gpu and not target.fp8:  # the cpu kernels convert fp8 in software
        raise KilnError(f"--quant fp8 needs hardware fp8 (e4m3) conversion and tensor cores, which target {target.name} "
                        f"lacks; targets that have them: {', '.join(fp8_targets())}. Use --quant int8 or int4 here")
    ctx = PassContext()
    graph = quantize_weights(graph, stored, options.quant, ctx, options.tp)
    for note in ctx.notes:
        log.info("%s", note)
    kept = {p.name for p in graph.params if "quant" in p.attrs}
    return graph, {name: fmt for name, fmt in stored.items() if name in kept}


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


__all__ = ["CompileOptions", "CompileSummary", "compile_cache_key", "compile_cached", "compile_model"]
