"""Runs an artifact's step programs: the `Executor` the engine drives (runtime/step_batch.py).

On the `cpu` target the programs are generated torch code; dense weights are used as the artifact
stores them (memory-mapped), the expert weights they name in `PACKED_EXPERTS` are packed into
oneDNN's layout, one expert at a time (`cpu_moe.pack_experts`); quantized weights are bound to
the artifact's compiled kernels for this CPU (`cpu_quant`), and cpu_ops runs its step ops on the
artifact's C kernels (`cpu_step_kernels.install`; process-wide). The KV cache is sized from a memory
budget: `kv_cache_memory` bytes on the CPU, of which the recurrent layers' state pool takes its
share first (runtime/state_pool.py). Decode-only batches run the `decode` program, every
other batch the `mixed` one, each step on the cores other processes leave free (`step_threads`).
Freed memory stays in the heap for the next step (`keep_freed_memory`) unless a step left much
more than decode steps use (`HeapTrim`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import safetensors.torch
import torch

from kiln.errors import KilnError
from kiln.quant import assemble_weights
from kiln.runtime import cpu_graph, cpu_moe, cpu_quant, cpu_step_kernels, kv_groups, kv_tiers, state_pool
from kiln.runtime.artifact import PHASES, Artifact
from kiln.runtime.collectives import Comm
from kiln.runtime.step_batch import StepBatch

log = logging.getLogger("kiln.executor")


def import_program(artifact: Artifact, phase: str) -> ModuleType:
    """The artifact's generated step program for `phase`, imported from its file."""
    path = artifact.file(f"program.{phase}.py")
    name = f"kiln_program_{abs(hash(str(path)))}_{phase}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise KilnError(f"cannot import the step program {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Without an explicit max_model_len, a model whose full context does not fit the KV budget runs
# with the context that fits (a warning says so), down to this many tokens; below, it is an error.
MIN_DEFAULT_CONTEXT = 2048


def fitted_context(max_model_len: int, fits: int, *, explicit: bool, budget: str, advice: str) -> int:
    """The context length to serve when the KV cache holds `fits` tokens: `max_model_len` when it
    fits; without an explicit --max-model-len, what fits (a warning says so), down to
    MIN_DEFAULT_CONTEXT; else a KilnError that says what to do (`advice`)."""
    if fits < max_model_len and not explicit and fits >= MIN_DEFAULT_CONTEXT:
        log.warning("max_model_len lowered from the model's %d to the %d tokens that %s holds (%s for the whole "
                    "context)", max_model_len, fits, budget, advice)
        return fits
    if fits < max_model_len:
        raise KilnError(f"{budget} holds {max(0, fits)} tokens of KV cache, fewer than max_model_len={max_model_len}: "
                        f"{advice} or lower --max-model-len")
    return max_model_len


class CpuExecutor:
    """Executes a `cpu`-target artifact with torch on the CPU."""

    def __init__(self, artifact: Artifact, *, kv_cache_memory: int = 1 << 30, max_model_len: int | None = None,
                 enforce_eager: bool = False, host_cache_memory: int = 0, rank: int = 0, comm: Comm | None = None):
        """`rank`, `comm`: this process's rank of a tensor-parallel artifact and its communicator
        (runtime/tensor_parallel.py); its step programs then run eagerly (no step graphs)."""
        if artifact.target != "cpu":
            raise KilnError(f"artifact {artifact.path} targets {artifact.target!r}; this machine runs `cpu` artifacts: "
                            "recompile with --target cpu")
        manifest = artifact.manifest
        self.block_size = manifest["block_size"]
        self.vocab_size = manifest["vocab_size"]
        self.max_model_len = min(max_model_len or manifest["max_model_len"], manifest["max_model_len"])
        keep_freed_memory()
        self.comm_args = () if comm is None else (comm,)
        self.weights: dict[str, Any] = assemble_weights(safetensors.torch.load_file(artifact.weights_file(rank)),
                                        manifest.quantized_weights)
        libraries = manifest.cpu_kernels or {}
        if manifest.quantized_weights:
            library = cpu_quant.load_quant_library(artifact.path, libraries.get("quant", {}))
            for name in manifest.quantized_weights:
                self.weights[name] = cpu_quant.bind(library, self.weights[name],
                                                    activation_bits=cpu_quant.ACTIVATION_BITS[manifest.quant_activations])
        step_kernels = cpu_step_kernels.load_step_library(artifact.path, libraries["step_ops"]) \
            if "step_ops" in libraries else None
        cpu_step_kernels.install(step_kernels)
        # decode steps replayed from recorded C calls (runtime/cpu_graph.py) unless `enforce_eager`
        self.graphs = None if step_kernels is None or enforce_eager or comm is not None else cpu_graph.CpuGraphs(
            step_kernels.replay, cpu_graph.table_width(self.max_model_len, self.block_size))
        self.programs = {phase: import_program(artifact, phase) for phase in PHASES}
        for name in set().union(*(program.PACKED_EXPERTS for program in self.programs.values())):
            self.weights[name] = cpu_moe.pack_experts(self.weights[name])
        self.cache_groups = kv_groups.manifest_groups(manifest)
        self.state_groups = list(manifest.recurrent_groups)
        self.num_state_slots = state_pool.fit_state_slots(self.state_groups, kv_cache_memory)
        block_bytes = kv_groups.block_bytes(self.cache_groups)
        kv_budget = kv_cache_memory - state_pool.pool_bytes(self.state_groups, self.num_state_slots)
        self.num_blocks = kv_budget // block_bytes if block_bytes else 0
        policies = [kv_groups.GroupPolicy(g) for g in self.cache_groups]
        needed = kv_groups.blocks_needed(policies, self.max_model_len, chunk=1) * block_bytes
        self.max_model_len = fitted_context(
            self.max_model_len, kv_groups.capacity_tokens(policies, self.num_blocks), explicit=max_model_len is not None,
            budget=f"a KV-cache budget of {kv_cache_memory / 2**20:.0f} MiB",
            advice=f"raise --kv-cache-memory to at least {needed / 2**20:.0f} MiB")
        self.state_pool = state_pool.allocate_state_pool(self.state_groups, self.num_state_slots, "cpu")
        kv_states = kv_groups.allocate_kv_states(self.cache_groups, self.num_blocks, "cpu")
        self.states = {**kv_states, **self.state_pool}
        log.info("%s", kv_groups.capacity_line(self.cache_groups, self.num_blocks))
        self.host_tier = kv_tiers.allocate_host_tier(kv_states, host_cache_memory)
        self.num_host_blocks = self.host_tier.num_blocks if self.host_tier else 0
        self.threads = torch.get_num_threads()
        self.step_threads: int | None = None  # the last step's
        self.load = OtherLoad(self.threads)
        self.heap = HeapTrim()

    def join_group(self, max_model_len: int) -> None:
        """A tensor-parallel rank: takes the context the ranks agreed on (runtime/tensor_parallel.py)."""
        self.max_model_len = max_model_len

    def execute(self, batch: StepBatch) -> torch.Tensor:
        program = self.programs["decode" if batch.is_decode_only else "mixed"]
        kv_tiers.run_transfers(self.host_tier, batch.kv_transfers)
        state_pool.copy_slots(self.state_pool, list(batch.state_copies))
        inputs = batch.inputs()
        caller_threads = torch.get_num_threads()
        self.step_threads = threads = step_threads(self.threads, self.load.others)
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                logits = None if self.graphs is None or not batch.is_decode_only else self.graphs.run(
                    program, inputs, self.weights, self.states, threads)
                if logits is None:
                    logits = program.step(inputs, self.weights, self.states, *self.comm_args)["logits"]
            self.load.update(threads)
        finally:
            torch.set_num_threads(caller_threads)
        self.heap.after_step()
        return logits.to(torch.float32, copy=True)  # a normal tensor: the sampler edits it in place


def step_threads(threads: int, others: float) -> int:
    """How many of our `threads` a step runs on: those whose cores other processes leave free
    (`others`: their runnable threads; over 0.75 of one takes a core). On a busy core every
    parallel op waits for a descheduled worker thread, about a scheduler time slice: on the
    2-core dev machine, beside another busy process, a batch-1 decode step took ~1.2 s on 2
    threads and ~30 ms on one (~20 ms on 2 threads when idle). Logits are bit-identical across
    thread counts."""
    return max(1, min(threads, int(threads + 0.75 - others)))


class OtherLoad:
    """How many threads other processes keep runnable on this machine (Linux; 0 elsewhere): the
    kernel's count of runnable threads (/proc/loadavg) right after a step, while our own threads
    still run or spin, less ours; averaged exponentially (weight 1/2 a step)."""

    def __init__(self, ours: int):
        self.others = max(0.0, _runnable_now() - ours)  # our threads may still spin after loading

    def update(self, ours: int) -> None:
        self.others += 0.5 * (_runnable_now() - ours - self.others)


def _runnable_now() -> float:
    """Threads runnable on the machine right now, the caller's included (/proc/loadavg's 4th
    field, "runnable/total"); where unknown, 1 (the caller)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 1.0


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def keep_freed_memory() -> None:
    """Has glibc's malloc reuse freed memory instead of handing it back to the OS: allocations
    under 32 MiB come from the heap and up to 1 GiB of free heap is kept. Otherwise a step's large
    temporaries (the gathered KV contexts, 16 MiB a layer at batch 32) are fresh pages each step,
    whose page faults (~120k a decode step at batch 32) took longer than the step's math.
    `HeapTrim` bounds what is kept after steps that free much more."""
    libc = _libc()
    if hasattr(libc, "mallopt"):  # glibc
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


# Freed heap a step may leave resident: above it the heap goes back to the OS. Decode steps keep
# less (SmolLM2-135M at batch 32 over 300-token contexts: ~70 MB), so their pages stay; a
# 2048-token prefill chunk freed ~3 GB (the step program keeps every activation alive until it
# returns), which glibc kept when the steps ran on a thread other than the main one (the server's).
RETAINED_HEAP = 256 << 20


class HeapTrim:
    """After a step whose freed heap made the process's resident memory grow more than `retain`
    bytes past where it was at the start or the last trim, hands every free heap page back to the
    OS (glibc's malloc_trim, which also releases free pages inside the heap, unlike the trim
    threshold of `keep_freed_memory`, which only cuts its top). Made once loading is done, it trims
    at once: what loading freed (the tokenizer's parsed JSON, ~30 MB for SmolLM2's) goes back too.
    Without glibc it does nothing."""

    def __init__(self, retain: int = RETAINED_HEAP):
        self.retain = retain
        self.malloc_trim = getattr(_libc(), "malloc_trim", None)
        self.trim()

    def trim(self) -> None:
        """Hands every free heap page back to the OS now; the resident memory after it is the new floor."""
        if self.malloc_trim is not None:
            self.malloc_trim(0)
        self.floor = resident_bytes()

    def after_step(self) -> bool:
        """Trims if the step left more than `retain` bytes resident; whether it did."""
        if self.malloc_trim is None or resident_bytes() - self.floor <= self.retain:
            return False
        self.trim()
        return True


def resident_bytes() -> int:
    """This process's resident memory (Linux: /proc/self/statm); 0 where unknown."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0
