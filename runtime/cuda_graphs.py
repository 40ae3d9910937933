"""Decode steps replayed from CUDA graphs, one per (batch-size bucket, context bucket) (the GPU
executor's).

What a decode program launches depends only on the batch size B (grids, the GEMM tile bucket),
the block-table width M and the number of split-K chunks, which the program derives from the
longest context of the step (`launcher.max_context`), never on the values in the step tensors.
So the launches are captured once per bucket pair, over static input buffers, and a step of B
sequences whose longest context is L copies its inputs into those buffers and replays the graph
of the smallest batch bucket >= B and the smallest context bucket >= L:
  - rows B.. of a bucket are padding: token 0 at position 0, seq_len 1, slot -1 (kv_write skips
    it), block-table row 0; their logits are computed and dropped;
  - block tables are M = ceil(max_model_len / block_size) columns wide (kernels read a row only
    up to its sequence's length, so the columns past it may hold anything);
  - context buckets are powers of two from CONTEXT_FLOOR below max_model_len, then max_model_len
    (`context_buckets`); split-K decode is sized for the bucket's bound (`launcher.max_context`
    returns it): the kernels cut each sequence's own context into the splits on the device, and a
    shorter sequence leaves some of them empty. So a short context pays the splits (and the
    reduce) of its bucket, not of max_model_len.
Many bucket pairs launch the same kernels (a batch that fills the GPU never splits; the split
count saturates at MAX_DECODE_SPLITS), and those share one graph. Which ones do is found without
the compiler: a dry run of the program per pair through `_Recorder`, a launcher that records each
launch (kernel name, grid or the step sizes the launcher derives it from, scalar arguments,
tensor shapes) and runs nothing; pairs of one batch size with equal records share the graph of
the first (largest context) of them. A dry run stands for a real one because a program does all
its value-dependent work in its kernels (what the interpreted path below checks at every step).
Building the plans costs one Python pass of the program per pair (SmolLM2-135M, 35 batch buckets
x 6 context buckets up to 8192 on h100: 210 dry runs, 57 distinct graphs).
Decode batches larger than the largest bucket, and every mixed batch, run eagerly.
A replay launches nothing from Python, so the launcher's checks of its kernels' arguments (count,
16-byte alignment: runtime/launcher.py) ran once, at capture, on the very addresses replays reuse.
All graphs share one memory pool (one replay runs at a time).

Without a GPU (`capture=False`: the GPU program interpreted on the CPU) the same buffers,
padding, buckets and sharing run the program directly at each "replay" (recording its launches
and checking them against the dry run's), which tests everything here but the capture itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

import torch

from kiln.contract import STEP_INPUT_NAMES, group_input_names
from kiln.runtime.step_batch import StepBatch

log = logging.getLogger("kiln.executor")

Program = Callable[[dict, object], torch.Tensor]  # (step inputs, launcher) -> logits [B, vocab]
Plan = tuple[tuple[Hashable, ...], ...]  # a program's launches: (kernel name, grid, arguments), in order
CONTEXT_FLOOR = 256  # the smallest context bucket: one split-K chunk's worth of keys (MIN_SPLIT_TOKENS)


def capture_sizes(max_num_seqs: int, largest: int = 256) -> list[int]:
    """The batch-size buckets, as vLLM's: 1, 2, 4, then every multiple of 8, up to
    min(max_num_seqs, largest) (which is a bucket too)."""
    top = max(1, min(max_num_seqs, largest))
    sizes = [s for s in (1, 2, 4, *range(8, top + 1, 8)) if s <= top]
    return sizes if sizes[-1] == top else [*sizes, top]


def context_buckets(max_model_len: int, floor: int = CONTEXT_FLOOR) -> list[int]:
    """The context buckets: powers of two from `floor` below max_model_len, then max_model_len."""
    bounds, bound = [], floor
    while bound < max_model_len:
        bounds.append(bound)
        bound *= 2
    return [*bounds, max_model_len]


class _BoundedLauncher:
    """The executor's launcher with split-K sized for a fixed longest context."""

    def __init__(self, launcher, max_context: int):
        self._launcher, self._max_context = launcher, max_context

    def __getattr__(self, name: str):
        return getattr(self._launcher, name)

    def max_context(self, seq_lens: torch.Tensor) -> int:
        return self._max_context


class _Recorder:
    """A launcher that records the launches of a program run as its `plan`: per launch the
    kernel's name, the grid (or step sizes) and its arguments (a tensor as its shape and dtype); it runs them
    through `launcher` when `forward`, else nothing (a dry run: buffers are still allocated, so
    the program runs as it would, but no kernel reads or writes them)."""

    def __init__(self, launcher, forward: bool):
        self._launcher, self._forward = launcher, forward
        self.launches: list[tuple[Hashable, ...]] = []

    def __getattr__(self, name: str):
        return getattr(self._launcher, name)

    def launch(self, kernel, grid: tuple[int, ...], *args) -> None:
        name = getattr(kernel, "cache_key", None) or getattr(kernel, "name", kernel)
        self.launches.append((name, tuple(grid), *map(_argument, args)))
        if self._forward:
            self._launcher.launch(kernel, grid, *args)

    @property
    def plan(self) -> Plan:
        return tuple(self.launches)


def _argument(value) -> Hashable:
    """A launch argument as a plan records it: a tensor by its shape and dtype, a scalar as itself."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


class DecodeGraphs:
    """Static-buffer decode steps over `sizes` batch buckets x context buckets of the program
    `run(inputs, launcher)`.

    launcher: the executor's (its device is the buffers'); max_model_len, block_size: bound the
    block-table width and the context buckets (`context_buckets(max_model_len, context_floor)`);
    capture: record CUDA graphs (on a GPU).
    After construction: `plans[(size, bound)]`, the launches of each bucket pair (from a dry run);
    `graph_keys`, the pairs that own a graph (captured on a GPU), every pair replaying the graph
    of `shared[(size, bound)]`; `last_key`, the pair whose graph the last step replayed."""

    def __init__(self, run: Program, launcher, sizes: list[int], *, max_model_len: int, block_size: int,
                 capture: bool, num_groups: int = 1, context_floor: int = CONTEXT_FLOOR):
        self.sizes = sorted(sizes)
        self.contexts = context_buckets(max_model_len, context_floor)
        self.replays = 0
        self.last_key: tuple[int, int] | None = None
        self._run = run
        self._launchers = {bound: _BoundedLauncher(launcher, bound) for bound in self.contexts}
        largest = self.sizes[-1]
        width = self._width = -(-max_model_len // block_size)
        device = launcher.device
        self._num_groups = num_groups
        names = [*STEP_INPUT_NAMES, *(name for g in range(1, num_groups) for name in group_input_names(g))]
        self._tables = {group_input_names(g)[0] for g in range(num_groups)}
        shapes = {name: (largest + 1,) if name == "query_start" else (largest, width) if name in self._tables
                  else (largest,) for name in names}
        pin = device.type == "cuda"
        self._host = {name: torch.zeros(shape, dtype=torch.int32, pin_memory=pin) for name, shape in shapes.items()}
        self._device = {name: torch.zeros(shape, dtype=torch.int32, device=device) for name, shape in shapes.items()}
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, int], torch.Tensor] = {}
        self._copied = torch.cuda.Event() if pin else None  # the last host -> device copy's end
        self.plans, self.shared = self._plan_all()
        self.graph_keys = sorted(set(self.shared.values()), reverse=True)  # largest first: the capture order
        if capture:
            self._capture_all()

    def fits(self, batch: StepBatch) -> bool:
        """Whether `batch` replays a bucket: decode-only, at most the largest bucket, block
        tables and contexts within max_model_len."""
        return (batch.is_decode_only and batch.num_seqs <= self.sizes[-1]
                and batch.block_tables.shape[1] <= self._width and _longest(batch) <= self.contexts[-1])

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Logits [B, vocab] of a batch that `fits`, as a view of the bucket's static output
        (valid until the next replay)."""
        size = next(s for s in self.sizes if s >= batch.num_seqs)
        longest = _longest(batch)
        key = self.last_key = self.shared[size, next(c for c in self.contexts if c >= longest)]
        inputs = self._load(batch, size)
        self.replays += 1
        if key in self._graphs:
            self._graphs[key].replay()
            return self._logits[key][: batch.num_seqs]
        recorder = _Recorder(self._launchers[key[1]], forward=True)
        logits = self._run(inputs, recorder)
        if recorder.plan != self.plans[key]:
            raise RuntimeError(f"the decode program launched other kernels for bucket {key} than its dry run did: "
                               "its launches depend on more than the batch size and the context bound")
        return logits[: batch.num_seqs]

    def _plan_all(self) -> tuple[dict[tuple[int, int], Plan], dict[tuple[int, int], tuple[int, int]]]:
        """The launches of every (size, bound) pair, from dry runs over padding inputs, and per pair
        the pair whose graph it replays: the largest bound of its size with the same launches."""
        plans: dict[tuple[int, int], Plan] = {}
        shared: dict[tuple[int, int], tuple[int, int]] = {}
        padding = self._padding()
        for size in self.sizes:
            owners: dict[Plan, tuple[int, int]] = {}
            for bound in reversed(self.contexts):
                recorder = _Recorder(self._launchers[bound], forward=False)
                self._run(self._load(padding, size), recorder)
                plans[size, bound] = recorder.plan
                shared[size, bound] = owners.setdefault(recorder.plan, (size, bound))
        return plans, shared

    def _load(self, batch: StepBatch, size: int) -> dict[str, torch.Tensor]:
        """Stages `batch` padded to `size` rows and copies those rows to the device buffers;
        returns the device buffers' views for the bucket (the program's inputs)."""
        if self._copied is not None:
            self._copied.synchronize()  # the last copy has read the host buffers: free to rewrite
        self._stage(batch, size)
        inputs = _bucket_views(self._device, size)
        for name, rows in _bucket_views(self._host, size).items():
            inputs[name].copy_(rows, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return inputs

    def _stage(self, batch: StepBatch, size: int) -> None:
        """Writes `batch` and the padding rows up to `size` into the host buffers."""
        host, b, width = self._host, batch.num_seqs, batch.block_tables.shape[1]
        for name, value in batch.inputs().items():
            if name in self._tables:
                host[name][:b, :width] = value
                host[name][b:size, 0] = 0
            elif name != "query_start":
                host[name][:b] = value
                host[name][b:size] = -1 if name.startswith("slot_mapping") else 1 if name == "seq_lens" else 0
        host["query_start"][: size + 1] = torch.arange(size + 1, dtype=torch.int32)
        host["logits_indices"][b:size] = torch.arange(b, size, dtype=torch.int32)

    def _padding(self) -> StepBatch:
        """A batch of no sequences: staged to a bucket, all its rows are padding."""
        empty = {name: buffer[:0] for name, buffer in self._host.items()}
        groups = tuple((empty.pop(table), empty.pop(slots))
                       for table, slots in map(group_input_names, range(1, self._num_groups)))
        return StepBatch(**empty, num_decodes=0, group_tables=groups)

    def _capture_all(self) -> None:
        """Captures the graph of every pair in `graph_keys`, largest first, into one memory pool
        that all of them share (one replay runs at a time, and a smaller bucket's buffers fit in
        a larger one's)."""
        start, pool = time.perf_counter(), torch.cuda.graph_pool_handle()
        padding = self._padding()
        for size, bound in self.graph_keys:
            inputs, launcher = self._load(padding, size), self._launchers[bound]
            self._run(inputs, launcher)  # eager first: lazy initialisation stays out of the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[size, bound] = self._run(inputs, launcher)
            self._graphs[size, bound] = graph
        torch.cuda.synchronize()
        log.info("captured %d CUDA graphs for %d decode batch sizes (%d..%d) x %d context buckets (%d..%d) in %.1f s",
                 len(self._graphs), len(self.sizes), self.sizes[0], self.sizes[-1], len(self.contexts),
                 self.contexts[0], self.contexts[-1], time.perf_counter() - start)


def _longest(batch: StepBatch) -> int:
    """The longest context of a batch (from its host seq_lens)."""
    return int(batch.seq_lens.max()) if batch.num_seqs else 0


def _bucket_views(buffers: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """The rows of step-input buffers that a bucket of `size` sequences uses."""
    return {name: buffer[: size + 1] if name == "query_start" else buffer[:size] for name, buffer in buffers.items()}
