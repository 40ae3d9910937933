"""The pass pipeline: one readable list of named steps, run once for what all phases share and
then once per phase ("mixed": some sequence brings a prefill chunk; "decode": every sequence
brings one token), giving one lowered graph per phase; the executor picks by the batch.

`run_pipeline(graph, options)` returns the lowered graphs and a report (launches before and
after fusion, launches per decoder layer, peak activation bytes). With `dump_dir` it writes the
IR after every step (`NN-<step>.txt`, shared steps at the top, each phase's in `<phase>/`), each
step's notes as `#` lines at its top, the fusion decisions (`<phase>/fusion.txt`) and the report
(`report.txt`). With `verify` (on in tests) the verifier runs after every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sympy

from kiln.ir import Graph, print_graph, verify
from kiln.passes.context import PHASES, REPRESENTATIVE_SIZES, KernelCheck, PassContext
from kiln.passes.cost import launches, launches_per_layer
from kiln.passes.cse import eliminate_common_subexpressions
from kiln.passes.dce import eliminate_dead_code
from kiln.passes.fold_constants import fold_constants
from kiln.passes.fold_norm_weights import fold_norm_weights
from kiln.passes.fuse import fuse
from kiln.passes.lower_attention import lower_attention
from kiln.passes.pack_weights import pack_weights
from kiln.passes.plan_memory import peak_activation_bytes, plan_memory
from kiln.passes.sink_row_gather import sink_row_gather
from kiln.passes.specialize_phase import specialize_phase


@dataclass(frozen=True)
class Step:
    name: str
    stage: str  # canonicalize, pack weights, fold, lower, fuse, plan memory
    run: Callable[[Graph, PassContext], Graph]


# Attention is lowered before fusion (DESIGN.md lists fuse first): lowering exposes the KV
# writes as ops, so the general fusion rules can put them in the rope kernel.
SHARED_STEPS = (
    Step("eliminate_dead_code", "canonicalize", eliminate_dead_code),
    Step("eliminate_common_subexpressions", "canonicalize", eliminate_common_subexpressions),
    Step("fold_constants", "canonicalize", fold_constants),
    Step("pack_weights", "pack weights", pack_weights),
    Step("sink_row_gather", "fold", sink_row_gather),
    Step("fold_norm_weights", "fold", fold_norm_weights),
)
PHASE_STEPS = (
    Step("specialize_phase", "lower", specialize_phase),
    Step("lower_attention", "lower", lower_attention),
    Step("fuse", "fuse", fuse),
    Step("plan_memory", "plan memory", plan_memory),
)


@dataclass(frozen=True)
class PipelineOptions:
    phases: tuple[str, ...] = PHASES
    dump_dir: Path | None = None  # `kiln compile --dump-ir DIR`
    verify: bool = False  # run the verifier after every step (tests do)
    sizes: dict = field(default_factory=lambda: dict(REPRESENTATIVE_SIZES))  # where cost decisions are made
    kernel_check: KernelCheck | None = None  # the target's "can you render this kernel?" (fusion asks it)


@dataclass
class StepRecord:
    phase: str  # "shared" or the phase
    step: Step
    nodes: int
    launches: int
    launches_per_layer: float
    seconds: float
    notes: list[str]


@dataclass
class PipelineReport:
    steps: list[StepRecord] = field(default_factory=list)
    peak_activation_bytes: dict[str, sympy.Expr] = field(default_factory=dict)  # per phase, of T and B

    def record(self, phase: str, step_name: str) -> StepRecord:
        return next(r for r in self.steps if r.phase == phase and r.step.name == step_name)

    def _around_fusion(self, phase: str) -> tuple[StepRecord, StepRecord]:
        records = [r for r in self.steps if r.phase in ("shared", phase)]
        fused = next(i for i, r in enumerate(records) if r.step.name == "fuse")
        return records[fused - 1], records[fused]

    def launches(self, phase: str) -> tuple[int, int]:
        """Kernel launches of one step of `phase`, before and after fusion."""
        before, after = self._around_fusion(phase)
        return before.launches, after.launches

    def launches_per_layer(self, phase: str) -> tuple[float, float]:
        """Launches per decoder layer (cost.layer_launches), before and after fusion."""
        before, after = self._around_fusion(phase)
        return before.launches_per_layer, after.launches_per_layer

    def summary(self) -> str:
        lines = [f"{'step':32} {'stage':13} {'phase':7} {'nodes':>5} {'launches':>8} {'per layer':>9} {'ms':>5}"]
        for r in self.steps:
            lines.append(f"{r.step.name:32} {r.step.stage:13} {r.phase:7} {r.nodes:5} {r.launches:8} "
                         f"{r.launches_per_layer:9.2f} {r.seconds * 1e3:5.0f}")
        for phase, peak in self.peak_activation_bytes.items():
            (before, after), (steps_before, steps_after) = self.launches_per_layer(phase), self.launches(phase)
            lines.append(f"{phase}: {before:.2f} -> {after:.2f} launches per decoder layer "
                         f"({steps_before} -> {steps_after} per step); peak activations {peak} bytes")
        return "\n".join(lines) + "\n"


def _run_steps(graph: Graph, steps, phase: str, ctx: PassContext, options: PipelineOptions, report: PipelineReport,
               dump: Path | None, first: int) -> Graph:
    for n, step in enumerate(steps, start=first):
        start, noted = time.perf_counter(), len(ctx.notes)
        graph = step.run(graph, ctx)
        seconds = time.perf_counter() - start
        if options.verify:
            verify(graph)
        notes = ctx.notes[noted:]
        report.steps.append(StepRecord(phase, step, len(graph.nodes), launches(graph), launches_per_layer(graph),
                                       seconds, notes))
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            header = "".join(f"# {line}\n" for line in notes)
            (dump / f"{n:02d}-{step.name}.txt").write_text(header + print_graph(graph))
            if step.name == "fuse":
                (dump / "fusion.txt").write_text("\n".join(notes) + "\n")
    return graph


def run_pipeline(graph: Graph, options: PipelineOptions = PipelineOptions()) -> tuple[dict[str, Graph], PipelineReport]:
    """The lowered graph of every phase in `options.phases`, and the report."""
    if options.verify:
        verify(graph)
    report = PipelineReport()
    dump = Path(options.dump_dir) if options.dump_dir is not None else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "00-traced.txt").write_text(print_graph(graph))
    shared = _run_steps(graph, SHARED_STEPS, "shared", PassContext(sizes=options.sizes), options, report, dump, 1)
    lowered = {}
    for phase in options.phases:
        ctx = PassContext(phase=phase, sizes=options.sizes, kernel_check=options.kernel_check)
        where = dump / phase if dump is not None else None
        lowered[phase] = _run_steps(shared, PHASE_STEPS, phase, ctx, options, report, where, len(SHARED_STEPS) + 1)
        report.peak_activation_bytes[phase] = peak_activation_bytes(lowered[phase])
    if dump is not None:
        (dump / "report.txt").write_text(report.summary())
    return lowered, report
