"""GPU targets: a lowered graph per phase -> the kernels to generate and each phase's step program.

`build_gpu_program(graphs, target)` walks every phase's lowered graph in order. Sources and views
launch nothing (but a slice a plain op reads: kernels take whole buffers, so it is copied
contiguous); every other node is one kernel launch, matched to a kernel template by
codegen/gpu_match.py. The result, a `GpuProgram`, holds:
  - the kernels: each distinct variant (by cache key, which is also the kernel's name) with its
    kind module, rendered to `kernels/<name>.py` and, for a GPU target, cross-compiled;
  - per phase, the source of `program.<phase>.py`, a function
        step(inputs, weights, states, launcher, comm=None) -> {"logits": [B, vocab]}
    that binds the step's sizes (T, B, M) from the inputs, allocates the memory plan's buffers
    (graph.buffers), and launches the kernels in graph order with grids from the kernel
    modules' own `grid` helpers. `weights` maps each param's name to its tensor, or, for a
    quantized one (attrs["quant"]), to a kiln.quant.QuantizedTensor whose `qweight` and `scales`
    the GEMM and embedding launches pass. `launcher` (runtime/launcher.py) runs a kernel from the
    artifact's compiled binaries on a GPU, or its source under TRITON_INTERPRET=1 on a CPU.
    `comm` (kiln.runtime.collectives.Comm) is the rank's communicator: a tensor-parallel graph's
    collectives call it between launches (`comm.all_reduce(x)`, copied into the node's planned
    buffer); a graph without collectives never reads it.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import sympy

from kiln.codegen.aot import CompiledKernel
from kiln.codegen.gpu_match import emit_launch
from kiln.codegen.kernels import compile_variants
from kiln.codegen.match_common import Site
from kiln.codegen.render import write_if_changed
from kiln.codegen.targets import Target, get_target
from kiln.errors import KilnError
from kiln.ir import Graph, Node, TupleType
from kiln.ir.ops import TORCH_DTYPE_NAMES

log = logging.getLogger("kiln.compile")

@dataclass
class GpuProgram:
    """What GPU code generation produced for one model and target."""

    target: Target
    sources: dict[str, str]  # phase -> source of program.<phase>.py
    kernels: dict[str, tuple[ModuleType, object]]  # kernel name (cache key) -> (kind module, variant)

    def kernel_table(self) -> dict[str, dict]:
        """Per kernel: kind, runtime signature, constexprs, warps and stages (json-able; what a
        launcher needs besides the source or binary)."""
        return {
            name: {"kind": kind.KIND, "signature": kind.signature(variant), "constexprs": kind.constexprs(variant),
                   "num_warps": variant.num_warps, "num_stages": variant.num_stages}
            for name, (kind, variant) in sorted(self.kernels.items())
        }

    def start_compile(self, processes: int = 2) -> PendingCompile:
        """Starts cross-compiling every kernel for the (GPU) target in `processes` separate
        processes, so that it overlaps with what this process does next (loading weights)."""
        jobs = [(kind.KIND, variant) for _, (kind, variant) in sorted(self.kernels.items())]
        shares = [jobs[i::processes] for i in range(processes)]
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        futures = [pool.submit(_compile_jobs, share, self.target.name) for share in shares]
        pool.shutdown(wait=False)
        return PendingCompile(futures, shares, self.target.name, time.perf_counter())

    def write(self, directory: Path) -> None:
        """Writes `kernels/<name>.py` for every kernel and `program.<phase>.py` for every phase."""
        for name, (kind, variant) in self.kernels.items():
            write_if_changed(Path(directory) / "kernels" / f"{name}.py", kind.render(variant))
        for phase, source in self.sources.items():
            write_if_changed(Path(directory) / f"program.{phase}.py", source)


@dataclass
class PendingCompile:
    """Kernels compiling in other processes; each future holds every n-th kernel of the table."""

    futures: list[Future]
    shares: list[list[tuple[str, object]]]  # the jobs of each future
    target_name: str
    started: float

    def result(self) -> tuple[list[CompiledKernel], float]:
        """The compiled kernels in table order, and the seconds from the start until all were done.
        A share whose process could not run (e.g. spawn cannot re-import a `python -` main
        module) is compiled here instead."""
        parts = []
        for future, share in zip(self.futures, self.shares):
            try:
                parts.append(future.result())
            except BrokenProcessPool:
                log.warning("a kernel compile process failed to start; compiling its %d kernels here", len(share))
                parts.append(_compile_jobs(share, self.target_name))
        kernels = [None] * sum(map(len, parts))
        for index, part in enumerate(parts):
            kernels[index::len(parts)] = part
        return kernels, time.perf_counter() - self.started


def _compile_jobs(jobs: list[tuple[str, object]], target_name: str) -> list[CompiledKernel]:
    """(kind name, variant) jobs compiled for a target (in a compile process)."""
    target = get_target(target_name)
    return compile_variants([(importlib.import_module(f"kiln.codegen.kernels.{kind}"), variant, target)
                             for kind, variant in jobs])


def build_gpu_program(graphs: dict[str, Graph], target: Target) -> GpuProgram:
    """The kernels and step programs of the lowered `graphs` (phase -> graph) for `target`.

    `target` may be `cpu`: its small tiles serve kernels run under TRITON_INTERPRET=1 (tests)."""
    kernels: dict[str, tuple[ModuleType, object]] = {}
    sources = {phase: _ProgramBuilder(graph, target, kernels).render() for phase, graph in graphs.items()}
    return GpuProgram(target, sources, kernels)


def _kernel_record(kind: ModuleType, variant) -> str:
    """The source of the `step_support.Kernel` a program launches `variant` by: its name and grid
    (and, for a kernel that reduces across programs, its scratch sizes)."""
    scratch = getattr(kind, "scratch_source", lambda v: None)(variant)
    return f"Kernel({variant.cache_key!r}, {kind.grid_source(variant)}" + (f", {scratch})" if scratch else ")")


class _ProgramBuilder:
    """Renders one phase's step program (the `ProgramBuilder` the matchers talk to)."""

    def __init__(self, graph: Graph, target: Target, kernels: dict):
        self.graph, self.target, self.kernels = graph, target, kernels
        self.constants: dict[str, str] = {}  # program constant name -> its source
        self.hoisted: dict[str, str] = {}  # per-step value name -> expression

    # -- the ProgramBuilder protocol (codegen/match_common.py) --

    def variant(self, kind: ModuleType, variant) -> str:
        self.kernels[variant.cache_key] = (kind, variant)
        return self._named(kind.KIND.upper(), _kernel_record(kind, variant))

    def bucketed(self, kind: ModuleType, variants: dict[str, object], rows: str) -> str:
        if len({v.cache_key for v in variants.values()}) == 1:
            return self.variant(kind, next(iter(variants.values())))
        for variant in variants.values():
            self.kernels[variant.cache_key] = (kind, variant)
        bucket = self.hoist(f"bucket_{rows}", f"bucket({rows}, {', '.join(map(str, kind.BUCKET_BOUNDS))})")
        entries = "".join(f"\n    {name!r}: {_kernel_record(kind, variant)}," for name, variant in variants.items())
        return f"{self._named(f'{kind.KIND.upper()}_BY_BUCKET', '{' + entries + chr(10) + '}')}[{bucket}]"

    def rope_table(self, spec) -> str:
        values = ", ".join(repr(v) for v in spec.inv_freq().tolist())
        name = self._named("INV_FREQ", f"torch.tensor([{values}], dtype=torch.float32)  # {spec}")
        return f"launcher.constant({name})"

    def hoist(self, name: str, expression: str) -> str:
        if self.hoisted.setdefault(name, expression) != expression:
            raise ValueError(f"per-step value {name} hoisted twice with different expressions")
        return name

    # -- rendering --

    def _named(self, prefix: str, source: str) -> str:
        for name, existing in self.constants.items():
            if existing == source:
                return name
        name = f"{prefix}_{sum(1 for n in self.constants if n.rsplit('_', 1)[0] == prefix)}"
        self.constants[name] = source
        return name

    def render(self) -> str:
        values: dict[Node, list[str] | str] = {}
        prelude, launches, bound = [], [], set()
        for position, node in enumerate(self.graph.nodes):
            if node.op == "input":
                values[node] = node.name
                prelude.append(f"{node.name} = launcher.to_device(inputs[{node.name!r}])")
                for axis, dim in enumerate(node.type.shape):
                    if isinstance(dim, sympy.Symbol) and dim not in bound:
                        bound.add(dim)
                        prelude.append(f"{dim} = {node.name}.shape[{axis}]")
            elif node.op in ("param", "state"):
                values[node] = f"{'weights' if node.op == 'param' else 'states'}[{node.name!r}]"
            elif node.op in ("reshape", "get"):
                source = values[node.inputs[0]]
                values[node] = source[node.attrs["index"]] if node.op == "get" else \
                    f"{source}.view({', '.join(map(str, node.type.shape))})"
            elif node.op == "slice":  # read by a plain op: kernels take whole buffers, so a contiguous copy
                start, stop = node.attrs["start"], node.attrs["stop"]
                values[node] = f"v{position}"
                launches.append(f"v{position} = {values[node.inputs[0]]}.narrow({node.attrs['dim']}, {start}, "
                                f"{stop - start}).contiguous()  # a slice outside a fused group")
            else:
                values[node] = self._launch(node, f"v{position}", values, launches)
        allocations = [f"b{i} = launcher.empty(({buffer.shape[0]},), {TORCH_DTYPE_NAMES[buffer.dtype]})"
                       for i, buffer in enumerate(self.graph.buffers)]
        hoisted = [f"{name} = {expression}" for name, expression in self.hoisted.items()]
        outputs = ", ".join(f"{name!r}: {values[node]}" for name, node in self.graph.outputs.items())
        body = [*prelude, *allocations, *hoisted, *launches, f"return {{{outputs}}}"]
        return self._module_source(body)

    def _launch(self, node: Node, name: str, values: dict, lines: list[str]) -> list[str] | str:
        """Emits `node`'s launch; returns its value (a buffer view, or a list for several outputs)."""
        buffers = node.attrs["buffer"] if isinstance(node.type, TupleType) else (node.attrs["buffer"],)
        types = node.type.types if isinstance(node.type, TupleType) else (node.type,)
        outputs = []
        for index, (buffer, type_) in enumerate(zip(buffers, types)):
            if buffer is None:
                outputs.append(None)
                continue
            output = f"{name}_{index}" if len(types) > 1 else name
            shape = ", ".join(map(str, type_.shape))
            lines.append(f"{output} = b{buffer}[:{type_.numel}].view({shape})")
            outputs.append(output)
        site = Site(node, [values[i] for i in node.inputs], outputs, self)
        lines.append(f"# {node.op if node.op != 'fused' else 'fused ' + str(node.attrs['pattern'])}")
        lines += emit_launch(site)
        cached = [_cache_written(node, index, site.inputs) for index, out in enumerate(outputs) if out is None]
        resolved = [out if out is not None else cached.pop(0) for out in outputs]
        return resolved if len(types) > 1 else resolved[0]

    def _module_source(self, body: list[str]) -> str:
        lines = [
            f'"""Step program of graph {self.graph.name!r} for target {self.target.name} (Triton kernels). '
            'Generated by kiln: do not edit.',
            "",
            "step(inputs, weights, states, launcher, comm=None): inputs are the step tensors (int32, on the CPU),",
            "weights and states (the KV caches) live on the launcher's device, which runs the kernels",
            "(kiln.runtime.launcher); comm is the rank's communicator (kiln.runtime.collectives), read only by",
            "tensor-parallel programs. Returns {\"logits\": [B, vocab]}. Every kernel choice was made at",
            "compile time: a kernel is a name and a grid function; this module needs kiln's runtime only.",
            '"""',
            "",
            "import torch",
            "import torch.nn.functional as F  # noqa: F401  (torch ops for what no template renders)",
            "",
            "from kiln.runtime import cpu_ops  # noqa: F401",
            "from kiln.runtime.step_support import (  # noqa: F401",
            "    Kernel, bucket, cdiv, combine_pairs, decode_splits, visible_keys,",
            ")",
            "",
            f"TARGET = {self.target.name!r}  # what it was generated for (load_artifact checks it)",
            *(f"{name} = {source}" for name, source in self.constants.items()),
            "",
            "",
            "def step(inputs, weights, states, launcher, comm=None):",
            *(f"    {line}" for line in body),
        ]
        return "\n".join(lines) + "\n"


def _cache_written(node: Node, index: int, inputs: list[str]) -> str:
    """The expression of the KV cache that output `index` of `node` is (a KV write returns its cache)."""
    if node.op == "kv_write":  # a KV write in a kernel of its own: its output is the cache it writes
        return inputs[1]
    body = node.attrs["body"] if node.op == "fused" else None
    if body is None:
        raise KilnError(f"{node.op} has an output without a buffer that is not a KV cache")
    inner = list(body.outputs.values())[index]
    while inner.op == "kv_write":
        inner = inner.inputs[1]
    if inner.op != "input":
        raise KilnError(f"output {index} of `{node.attrs['pattern']}` has no buffer and is not a KV cache it writes")
    return inputs[body.inputs.index(inner)]
