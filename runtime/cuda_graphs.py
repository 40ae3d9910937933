"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (the GPU executor's).

What a decode program launches depends only on the batch size B (grids, the GEMM tile bucket),
the block-table width M and the number of split-K chunks, never on the values in the step
tensors. So each bucket's launches are captured once, over static input buffers, and a step of
B sequences copies its inputs into those buffers and replays the smallest bucket >= B:
  - rows B.. of a bucket are padding: token 0 at position 0, seq_len 1, slot -1 (kv_write skips
    it), block-table row 0; their logits are computed and dropped;
  - block tables are M = ceil(max_model_len / block_size) columns wide (kernels read a row only
    up to its sequence's length, so the columns past it may hold anything);
  - split-K decode is sized for a context of max_model_len (`launcher.max_context`): the kernels
    cut each sequence's own context into the splits on the device, and a shorter sequence
    leaves some of them empty.
Decode batches larger than the largest bucket, and every mixed batch, run eagerly.
A replay launches nothing from Python, so the launcher's checks of its kernels' arguments (count,
16-byte alignment: runtime/launcher.py) ran once, at capture, on the very addresses replays reuse.

Without a GPU (`capture=False`: the GPU program interpreted on the CPU) the same buffers,
padding and fixed splits run the program directly at each "replay", which tests everything here
but the capture itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kiln.contract import STEP_INPUT_NAMES, group_input_names
from kiln.runtime.step_batch import StepBatch

log = logging.getLogger("kiln.executor")

Program = Callable[[dict, object], torch.Tensor]  # (step inputs, launcher) -> logits [B, vocab]


def capture_sizes(max_num_seqs: int, largest: int = 256) -> list[int]:
    """The batch-size buckets, as vLLM's: 1, 2, 4, then every multiple of 8, up to
    min(max_num_seqs, largest) (which is a bucket too)."""
    top = max(1, min(max_num_seqs, largest))
    sizes = [s for s in (1, 2, 4, *range(8, top + 1, 8)) if s <= top]
    return sizes if sizes[-1] == top else [*sizes, top]


class _BoundedLauncher:
    """The executor's launcher with split-K sized for a fixed longest context."""

    def __init__(self, launcher, max_context: int):
        self._launcher, self._max_context = launcher, max_context

    def __getattr__(self, name: str):
        return getattr(self._launcher, name)

    def max_context(self, seq_lens: torch.Tensor) -> int:
        return self._max_context


class DecodeGraphs:
    """Static-buffer decode steps over `sizes` buckets of the program `run(inputs, launcher)`.

    launcher: the executor's (its device is the buffers'); max_model_len, block_size: bound the
    block-table width and the split-K context; capture: record CUDA graphs (on a GPU)."""

    def __init__(self, run: Program, launcher, sizes: list[int], *, max_model_len: int, block_size: int,
                 capture: bool, num_groups: int = 1):
        self.sizes = sorted(sizes)
        self.replays = 0
        self._run = run
        self._launcher = _BoundedLauncher(launcher, max_model_len)
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
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._copied = torch.cuda.Event() if pin else None  # the last host -> device copy's end
        if capture:
            self._capture_all()

    def fits(self, batch: StepBatch) -> bool:
        """Whether `batch` replays a bucket: decode-only, at most the largest bucket, block
        tables within max_model_len."""
        return (batch.is_decode_only and batch.num_seqs <= self.sizes[-1]
                and batch.block_tables.shape[1] <= self._width)

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Logits [B, vocab] of a batch that `fits`, as a view of the bucket's static output
        (valid until the next replay)."""
        size = next(s for s in self.sizes if s >= batch.num_seqs)
        inputs = self._load(batch, size)
        self.replays += 1
        if size in self._graphs:
            self._graphs[size].replay()
            return self._logits[size][: batch.num_seqs]
        return self._run(inputs, self._launcher)[: batch.num_seqs]

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

    def _capture_all(self) -> None:
        """Captures every bucket, largest first, into one memory pool that all of them share
        (one replay runs at a time, and a smaller bucket's buffers fit in a larger one's)."""
        start, pool = time.perf_counter(), torch.cuda.graph_pool_handle()
        empty = {name: buffer[:0] for name, buffer in self._host.items()}
        groups = tuple((empty.pop(table), empty.pop(slots))
                       for table, slots in map(group_input_names, range(1, self._num_groups)))
        padding = StepBatch(**empty, num_decodes=0, group_tables=groups)
        for size in reversed(self.sizes):
            inputs = self._load(padding, size)
            self._run(inputs, self._launcher)  # eager first: lazy initialisation stays out of the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[size] = self._run(inputs, self._launcher)
            self._graphs[size] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs of %d decode batch sizes (%d..%d) in %.1f s", len(self.sizes), self.sizes[0],
                 self.sizes[-1], time.perf_counter() - start)


def _bucket_views(buffers: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """The rows of step-input buffers that a bucket of `size` sequences uses."""
    return {name: buffer[: size + 1] if name == "query_start" else buffer[:size] for name, buffer in buffers.items()}
