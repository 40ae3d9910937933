"""The GPU executor's steps replayed from CUDA graphs: decode steps per (batch-size bucket, context
bucket), mixed steps (prefill chunks + decodes) per (token bucket, sequence bucket), all over one
set of static input buffers and one memory pool (`StepGraphs`).

A step program does all its value-dependent work in its kernels: what it launches (kernels,
grids, scalar arguments) depends only on the step's sizes. So the launches are captured once per
bucket of sizes, over static input buffers, and a step copies its inputs into those buffers with
padding up to its bucket and replays the bucket's graph; the logits of the real rows are returned
([B, vocab], a view of the graph's output, valid until the next replay).

Decode (`DecodeGraphs`). The decode program's launches depend on the batch size B (grids, the
GEMM tile bucket), the block-table width M and the number of split-K chunks, which the program
derives from the longest context of the step (`launcher.max_context`). A step of B sequences whose
longest context is L replays the graph of the smallest batch bucket >= B and the smallest context
bucket >= L:
  - rows B.. of a bucket are padding: token 0 at position 0, seq_len 1, slot -1 (kv_write skips
    it), block-table row 0; their logits are computed and dropped;
  - context buckets are powers of two from CONTEXT_FLOOR below max_model_len, then max_model_len
    (`context_buckets`); split-K decode is sized for the bucket's bound (`launcher.max_context`
    returns it): the kernels cut each sequence's own context into the splits on the device, and a
    shorter sequence leaves some of them empty. So a short context pays the splits (and the
    reduce) of its bucket, not of max_model_len.

Mixed (`MixedGraphs`). What the mixed program launches depends only on T (input_ids rows), B
(block-table rows) and M: grids (the prefill attention's is the upper bound T // BLOCK_Q + B,
whose surplus programs return at once), the GEMM and MoE tile buckets of T and of B (the logits
GEMM); it never asks `launcher.max_context` (the launcher it runs with refuses, and the mixed
steps then stay eager). A step of T tokens over B sequences replays the pair (T_pad, B_pad):
T_pad the smallest token bucket >= T, B_pad the smallest sequence bucket >= B + 1 when T_pad > T
(the padding tokens need a sequence), else >= B. With n = B_pad - B padding sequences and
p = T_pad - T padding tokens, the first min(n, p) padding sequences get one token each and the
first of them also the p - n left over; each is a prompt of its own (positions 0.., seq_len its
token count, slot -1: nothing written; block-table row 0, so it reads block 0's keys: finite
values, as the cache starts zeroed) whose logits row (its last token) is dropped. Padding
sequences past p get no tokens (an empty query: seq_len 0, one attention tile that returns at
once, the logits row of the token before): that is what lets a chunk that filled the token budget
(T = max_num_batched_tokens, the common mixed step while a long prompt is chunked) replay the
largest token bucket next to any number of decodes.
  - token buckets: powers of two from TOKEN_FLOOR below max_num_batched_tokens, then
    max_num_batched_tokens (`token_buckets`): the static buffers hold that many token rows and no
    more; TOKEN_FLOOR is the GEMMs' smallest tile bucket (16 rows);
  - sequence buckets: powers of two from 2 up to the largest decode batch bucket S =
    min(max_num_seqs, 256), then S + 1 (`sequence_buckets`): a step of S sequences plus its
    padding one. Only pairs some step can reach are planned (B <= T, so B_pad's preceding bucket
    is below T_pad: `mixed_buckets`). Steps of more tokens or sequences run eagerly.
Why padded buckets, not vLLM's piecewise graphs (graphs of everything between attention calls,
captured per token count, with attention run eagerly between them): a kiln step program is one
flat list of launches whose attention kernels need no host-side metadata (the prefill grid is a
bound computed from T and B, the kernels find their sequence on the device), so the whole step,
attention included, can be one graph; piecewise graphs would keep one eager attention launch
per layer (the ~11-14 us of host time per launch this removes) and split the program. The costs:
a step pays for up to T_pad - T < T padding tokens through every linear (at most 2x the tokens,
less near the top bucket) and for the padding sequences' attention, one causal prompt of up to
p tokens: O(p^2) work (at p = 1024 about 1M query-key pairs a head, small beside the real
chunk's but not free); padding sequences cost an attention tile and a logits row each (at most
2x the sequences). The pool holds the activations of a max_num_batched_tokens step once more
(besides the eager warm-up's peak the KV cache was sized after).

Many bucket pairs launch the same kernels (a decode batch that fills the GPU never splits; the
split count saturates at MAX_DECODE_SPLITS), and those share one graph. Which ones do is found
without the compiler: a dry run of the program per pair through `_Recorder`, a launcher that
records each launch (kernel name, grid or the step sizes the launcher derives it from, scalar
arguments, tensor shapes) and runs nothing; pairs with the same input rows and equal records
share the graph of the largest of them (for mixed pairs the shapes always differ: no sharing).
A dry run stands for a real one because a program does all its value-dependent work in its
kernels (what the interpreted path below checks at every step). Building the plans costs one
Python pass of a program per pair. SmolLM2-135M on h100 at the defaults (max_num_seqs 256,
max_num_batched_tokens 2048, max_model_len 8192): decode 35 batch buckets x 6 context buckets,
210 dry runs, 57 graphs; mixed 8 token buckets (16..2048) x 9 sequence buckets (2..257), 57
reachable pairs, 57 graphs.

A replay launches nothing from Python, so the launcher's checks of its kernels' arguments (count,
16-byte alignment: runtime/launcher.py) ran once, at capture, on the very addresses replays reuse.
All graphs share one memory pool (one replay runs at a time), captured largest first (by token
rows) so that smaller buckets reuse its blocks, and one static output: each graph ends by copying
its logits rows into a [largest sequence bucket, vocab] buffer outside the pool (a copy of B x
vocab values per replay), so the pool holds no graph's output beyond its replay (at one output
per graph, SmolLM2's 114 graphs would keep about 0.75 GB of logits).

Without a GPU (`capture=False`: the GPU program interpreted on the CPU) the same buffers,
padding, buckets and sharing run the program directly at each "replay" (recording its launches
and checking them against the dry run's), which tests everything here but the capture itself.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable

import numpy as np
import torch

from kiln.contract import STEP_INPUT_NAMES, group_input_names
from kiln.runtime.step_batch import StepBatch

log = logging.getLogger("kiln.executor")

Program = Callable[[dict, object], torch.Tensor]  # (step inputs, launcher) -> logits [B, vocab]
Plan = tuple[tuple[Hashable, ...], ...]  # a program's launches: (kernel name, grid, arguments), in order
Key = tuple[int, int]  # a bucket pair: (batch size, context bound) for decode, (tokens, sequences) for mixed
CONTEXT_FLOOR = 256  # the smallest context bucket: one split-K chunk's worth of keys (MIN_SPLIT_TOKENS)
TOKEN_FLOOR = 16  # the smallest token bucket of mixed steps: the GEMMs' smallest tile bucket
LARGEST_BATCH = 256  # the largest decode batch bucket (and, plus one, the largest mixed sequence bucket)


def capture_sizes(max_num_seqs: int, largest: int = LARGEST_BATCH) -> list[int]:
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


def token_buckets(max_num_batched_tokens: int, floor: int = TOKEN_FLOOR) -> list[int]:
    """The token buckets of mixed steps: powers of two from `floor` below max_num_batched_tokens,
    then max_num_batched_tokens."""
    return context_buckets(max_num_batched_tokens, floor)


def sequence_buckets(largest: int) -> list[int]:
    """The sequence buckets of mixed steps: powers of two from 2 up to `largest` (the largest
    decode batch bucket), then largest + 1 (a step of `largest` sequences and a padding one)."""
    bounds, bound = [], 2
    while bound <= largest:
        bounds.append(bound)
        bound *= 2
    return [*bounds, largest + 1]


def mixed_buckets(tokens: list[int], seqs: list[int]) -> list[Key]:
    """The (token bucket, sequence bucket) pairs some mixed step reaches: a step of T tokens over
    B <= T sequences pads to B + 1 <= T_pad sequences when T < T_pad, else to B <= T = T_pad, so
    the sequence bucket before its own is below its token bucket."""
    return [(t, s) for t in tokens for before, s in zip([0, *seqs], seqs) if before < t]


def padding_counts(num_seqs: int, num_tokens: int) -> torch.Tensor:
    """The tokens of each of `num_seqs` padding sequences that share `num_tokens` padding tokens
    (int32 [num_seqs]): one each while they last, the first also the rest; none for the ones past
    `num_tokens`."""
    if num_tokens and not num_seqs:
        raise ValueError(f"{num_tokens} padding tokens need a padding sequence")
    counts = (torch.arange(num_seqs) < num_tokens).to(torch.int32)
    if num_seqs:
        counts[0] += max(0, num_tokens - num_seqs)
    return counts


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class StepBuffers:
    """The static step inputs graphs run on: host buffers (pinned on a GPU) where a step is staged
    with its padding, and device buffers that every graph was captured over. Token inputs
    (input_ids, positions, slot mappings) have `tokens` rows, sequence inputs `seqs` (query_start
    one more), block tables `width` columns (kernels read a row only up to its sequence's length,
    so the columns past it may hold anything). Padding sequences use state slot `padding_slot` (the
    state pool's spare row: runtime/state_pool.py), so they never write a sequence's state."""

    def __init__(self, device: torch.device, *, tokens: int, seqs: int, width: int, block_size: int,
                 num_groups: int = 1, padding_slot: int = 0):
        self.tokens, self.seqs, self.width, self.block_size = tokens, seqs, width, block_size
        self.padding_slot = padding_slot
        groups = [group_input_names(g) for g in range(num_groups)]
        self.tables = {table for table, _ in groups}
        self._slots = {slots for _, slots in groups}
        self._token_inputs = {"input_ids", "positions", *self._slots}
        names = [*STEP_INPUT_NAMES, *(name for group in groups[1:] for name in group)]
        shapes = {name: (seqs + 1,) if name == "query_start" else (seqs, width) if name in self.tables
                  else (tokens,) if name in self._token_inputs else (seqs,) for name in names}
        pin = device.type == "cuda"
        self._host = {name: torch.zeros(shape, dtype=torch.int32, pin_memory=pin) for name, shape in shapes.items()}
        self._device = {name: torch.zeros(shape, dtype=torch.int32, device=device) for name, shape in shapes.items()}
        self._numpy = {name: buffer.numpy() for name, buffer in self._host.items()}  # views of the same memory
        self._arange = np.arange(tokens, dtype=np.int32)
        self._copied = torch.cuda.Event() if pin else None  # the last host -> device copy's end
        self._output: torch.Tensor | None = None

    def output(self, like: torch.Tensor) -> torch.Tensor:
        """The static logits of every graph captured over these buffers ([seqs, vocab] in `like`'s
        dtype, on its device), allocated at the first capture, outside the graphs' pool: a graph
        copies its logits rows there, so that no graph keeps an output of its own alive in the pool
        (which would then hold one [B, vocab] block per graph)."""
        if self._output is None:
            self._output = torch.empty((self.seqs, *like.shape[1:]), dtype=like.dtype, device=like.device)
        if self._output.shape[1:] != like.shape[1:] or self._output.dtype != like.dtype:
            raise RuntimeError(f"graphs over one set of buffers return logits {tuple(self._output.shape[1:])} "
                               f"{self._output.dtype} and {tuple(like.shape[1:])} {like.dtype}")
        return self._output[: like.shape[0]]

    def holds(self, batch: StepBatch) -> bool:
        """Whether `batch`'s block tables fit the buffers' width (its sizes are the buckets' business)."""
        return all(table.shape[1] <= self.width for table, _ in _tables(batch))

    def load(self, batch: StepBatch, tokens: int, seqs: int) -> dict[str, torch.Tensor]:
        """Stages `batch` padded to `tokens` tokens over `seqs` sequences and copies those rows to
        the device buffers; returns the device buffers' views for the bucket (the program's inputs)."""
        if self._copied is not None:
            self._copied.synchronize()  # the last copy has read the host buffers: free to rewrite
        self._stage(batch, tokens, seqs)
        inputs = self._views(self._device, tokens, seqs)
        for name, rows in self._views(self._host, tokens, seqs).items():
            inputs[name].copy_(rows, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return inputs

    def padding(self) -> StepBatch:
        """A batch of no sequences: staged to a bucket, all its rows are padding."""
        empty = {name: buffer[:0] for name, buffer in self._host.items()}
        empty["query_start"] = self._host["query_start"][:1].clone().zero_()
        groups = tuple((empty.pop(table), empty.pop(slots))
                       for table, slots in map(group_input_names, range(1, len(self.tables))))
        return StepBatch(**empty, num_decodes=0, group_tables=groups)

    def _stage(self, batch: StepBatch, tokens: int, seqs: int) -> None:
        """Writes `batch` and the padding up to `tokens` tokens and `seqs` sequences into the host
        buffers, through numpy views (a slice assignment costs a fraction of torch's: this runs on
        the host before every replay): the padding of `padding_counts`, laid out as the module
        docstring says."""
        host, b, t = self._numpy, batch.num_seqs, batch.num_tokens
        for name, value in batch.inputs().items():
            array = value.numpy()
            if name in self.tables:
                host[name][:b, : array.shape[1]] = array
            else:
                host[name][: array.shape[0]] = array
        num_seqs, num_tokens = seqs - b, tokens - t
        if num_tokens and not num_seqs:
            raise ValueError(f"{num_tokens} padding tokens need a padding sequence")
        filled = min(num_seqs, num_tokens)  # padding sequences with tokens: the first takes the surplus
        first = num_tokens - filled + 1 if filled else 0
        if num_seqs:
            lens, ends = host["seq_lens"][b:seqs], host["query_start"][b + 1: seqs + 1]
            lens[:] = 0
            lens[:filled] = 1
            lens[0] = first
            np.cumsum(lens, dtype=np.int32, out=ends)
            ends += t
            np.subtract(ends, 1, out=host["logits_indices"][b:seqs])
            host["state_indices"][b:seqs] = self.padding_slot
            for table in self.tables:
                host[table][b:seqs, 0] = 0
                host[table][b, : _cdiv(first, self.block_size)] = 0
        if num_tokens:
            host["input_ids"][t:tokens] = 0
            host["positions"][t:tokens] = 0
            host["positions"][t: t + first] = self._arange[:first]
            for slots in self._slots:
                host[slots][t:tokens] = -1

    def _views(self, buffers: dict[str, torch.Tensor], tokens: int, seqs: int) -> dict[str, torch.Tensor]:
        """The rows of step-input buffers that a bucket of `tokens` tokens over `seqs` sequences uses."""
        return {name: buffer[: seqs + 1] if name == "query_start" else buffer[:tokens]
                if name in self._token_inputs else buffer[:seqs] for name, buffer in buffers.items()}


class _BoundedLauncher:
    """The executor's launcher with split-K sized for a fixed longest context."""

    def __init__(self, launcher, max_context: int):
        self._launcher, self._max_context = launcher, max_context

    def __getattr__(self, name: str):
        return getattr(self._launcher, name)

    def max_context(self, seq_lens: torch.Tensor) -> int:
        return self._max_context


class ContextDependentError(RuntimeError):
    """A mixed program asked for the step's longest context: its launches are not a function of
    its bucket's sizes alone."""


class _ContextFreeLauncher:
    """The executor's launcher for mixed programs, which must not size launches by a context."""

    def __init__(self, launcher):
        self._launcher = launcher

    def __getattr__(self, name: str):
        return getattr(self._launcher, name)

    def max_context(self, seq_lens: torch.Tensor) -> int:
        raise ContextDependentError("the mixed program sizes its launches by the step's longest context "
                                    "(launcher.max_context): its steps cannot replay (token, sequence) buckets")


class _Recorder:
    """A launcher that records the launches of a program run as its `plan`: per launch the
    kernel's name, the grid (or step sizes) and its arguments (a tensor as its shape and dtype); it runs them
    through `launcher` when `forward`, else nothing (a dry run: buffers are still allocated, so
    the program runs as it would, but no kernel reads or writes them)."""

    def __init__(self, launcher, forward: bool):
        self._launcher, self._forward = launcher, forward
        self.dry_run = not forward
        self.launches: list[tuple[Hashable, ...]] = []

    def __getattr__(self, name: str):
        return getattr(self._launcher, name)

    def launch(self, kernel, grid: tuple[int, ...], *args) -> None:
        name = getattr(kernel, "name", kernel)  # a step_support.Kernel by its name
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


class _BucketGraphs(ABC):
    """Graphs of one program over bucket pairs (`keys`), on `buffers`. Subclasses say which pair a
    step replays (`_key`), the rows of a pair (`rows`) and its launcher (`_launcher`).
    After construction: `plans[key]`, the launches of each pair (from a dry run); `graph_keys`,
    the pairs that own a graph (captured on a GPU), largest first, every pair replaying the graph
    of `shared[key]`; `last_key`, the pair whose graph the last step replayed; `replays`."""

    kind = ""  # the program's phase, for messages
    _sizes = ""  # what its launches may depend on, for messages

    def __init__(self, run: Program, buffers: StepBuffers, keys: Iterable[Key]):
        self.buffers = buffers
        self.replays = 0
        self.last_key: Key | None = None
        self._run = run
        self._graphs: dict[Key, torch.cuda.CUDAGraph] = {}
        self._logits: dict[Key, torch.Tensor] = {}
        self.plans, self.shared = self._plan_all(sorted(keys, reverse=True))
        self.graph_keys = sorted(set(self.shared.values()), reverse=True)

    @abstractmethod
    def rows(self, key: Key) -> tuple[int, int]:
        """(tokens, sequences) of a pair's inputs."""

    @abstractmethod
    def _key(self, batch: StepBatch) -> Key | None:
        """The pair `batch` pads to (None: none)."""

    @abstractmethod
    def _launcher(self, key: Key):
        """The launcher a pair's program runs with (its split-K context bound, for decode)."""

    def fits(self, batch: StepBatch) -> bool:
        """Whether `batch` replays a pair."""
        return self._key(batch) in self.shared and self.buffers.holds(batch)

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Logits [B, vocab] of a batch that `fits`, as a view of the pair's static output
        (valid until the next replay)."""
        bucket = self._key(batch)
        assert bucket is not None
        key = self.last_key = self.shared[bucket]
        inputs = self.buffers.load(batch, *self.rows(key))
        self.replays += 1
        if key in self._graphs:
            self._graphs[key].replay()
            return self._logits[key][: batch.num_seqs]
        recorder = _Recorder(self._launcher(key), forward=True)
        logits = self._run(inputs, recorder)
        if recorder.plan != self.plans[key]:
            raise RuntimeError(f"the {self.kind} program launched other kernels for bucket {key} than its dry run did: "
                               f"its launches depend on more than {self._sizes}")
        return logits[: batch.num_seqs]

    def _plan_all(self, keys: list[Key]) -> tuple[dict[Key, Plan], dict[Key, Key]]:
        """The launches of every pair, from dry runs over padding inputs, and per pair the pair
        whose graph it replays: the first of `keys` (largest first) with the same rows and launches."""
        plans: dict[Key, Plan] = {}
        shared: dict[Key, Key] = {}
        owners: dict[tuple[tuple[int, int], Plan], Key] = {}
        padding = self.buffers.padding()
        for key in keys:
            recorder = _Recorder(self._launcher(key), forward=False)
            self._run(self.buffers.load(padding, *self.rows(key)), recorder)
            plans[key] = recorder.plan
            shared[key] = owners.setdefault((self.rows(key), recorder.plan), key)
        return plans, shared

    def capture(self, key: Key, pool) -> None:
        """Captures the graph of `key` (one of `graph_keys`) into the memory pool `pool`."""
        inputs, launcher = self.buffers.load(self.buffers.padding(), *self.rows(key)), self._launcher(key)
        output = self.buffers.output(self._run(inputs, launcher))  # eager first: lazy initialisation stays out
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # a tensor-parallel rank's NCCL watchdog thread queries events while this thread captures:
        # "thread_local" keeps its calls from invalidating the capture (the collectives are captured)
        mode = "thread_local" if torch.distributed.is_available() and torch.distributed.is_initialized() else "global"
        with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
            output.copy_(self._run(inputs, launcher))  # the program's logits go back to the pool
        self._graphs[key] = graph
        self._logits[key] = output


def capture_graphs(families: list[_BucketGraphs]) -> None:
    """Captures the graphs of `families` into one memory pool that all of them share (one replay
    runs at a time), largest first (token rows, then sequence rows), so that the smaller ones
    reuse the blocks the largest allocated."""
    start, pool = time.perf_counter(), torch.cuda.graph_pool_handle()
    work = sorted(((family.rows(key), index, key) for index, family in enumerate(families)
                   for key in family.graph_keys), reverse=True)
    for _, index, key in work:
        families[index].capture(key, pool)
    torch.cuda.synchronize()
    log.info("captured %d CUDA graphs (%s) in %.1f s", len(work),
             ", ".join(f"{len(family.graph_keys)} {family.kind}" for family in families), time.perf_counter() - start)


class DecodeGraphs(_BucketGraphs):
    """Static-buffer decode steps over `sizes` batch buckets x context buckets of the program
    `run(inputs, launcher)`.

    launcher: the executor's (its device is the buffers'); max_model_len, block_size: bound the
    block-table width and the context buckets (`context_buckets(max_model_len, context_floor)`);
    capture: record CUDA graphs now (on a GPU; `StepGraphs` captures its families together);
    buffers: shared static inputs (default: its own). Keys are (size, bound)."""

    kind, _sizes = "decode", "the batch size and the context bound"

    def __init__(self, run: Program, launcher, sizes: list[int], *, max_model_len: int, block_size: int,
                 capture: bool, num_groups: int = 1, context_floor: int = CONTEXT_FLOOR,
                 buffers: StepBuffers | None = None):
        self.sizes = sorted(sizes)
        self.contexts = context_buckets(max_model_len, context_floor)
        self._launchers = {bound: _BoundedLauncher(launcher, bound) for bound in self.contexts}
        largest = self.sizes[-1]
        buffers = buffers or StepBuffers(launcher.device, tokens=largest, seqs=largest,
                                         width=_cdiv(max_model_len, block_size), block_size=block_size,
                                         num_groups=num_groups)
        super().__init__(run, buffers, [(size, bound) for size in self.sizes for bound in self.contexts])
        if capture:
            capture_graphs([self])

    def rows(self, key: Key) -> tuple[int, int]:
        return key[0], key[0]

    def _key(self, batch: StepBatch) -> Key | None:
        longest = _longest(batch)
        if not batch.is_decode_only or batch.num_seqs > self.sizes[-1] or longest > self.contexts[-1]:
            return None
        return (next(s for s in self.sizes if s >= batch.num_seqs), next(c for c in self.contexts if c >= longest))

    def _launcher(self, key: Key):
        return self._launchers[key[1]]


class MixedGraphs(_BucketGraphs):
    """Static-buffer mixed steps over `tokens` x `seqs` buckets (the pairs of `mixed_buckets`) of
    the program `run(inputs, launcher)`. Arguments as DecodeGraphs'; keys are (tokens, sequences).
    Raises ContextDependentError when the program asks for the step's longest context."""

    kind, _sizes = "mixed", "the token and sequence counts"

    def __init__(self, run: Program, launcher, tokens: list[int], seqs: list[int], *, max_model_len: int,
                 block_size: int, capture: bool, num_groups: int = 1, buffers: StepBuffers | None = None):
        self.tokens, self.seqs = sorted(tokens), sorted(seqs)
        self._context_free = _ContextFreeLauncher(launcher)
        buffers = buffers or StepBuffers(launcher.device, tokens=self.tokens[-1], seqs=self.seqs[-1],
                                         width=_cdiv(max(max_model_len, self.tokens[-1]), block_size),
                                         block_size=block_size, num_groups=num_groups)
        super().__init__(run, buffers, mixed_buckets(self.tokens, self.seqs))
        if capture:
            capture_graphs([self])

    def rows(self, key: Key) -> tuple[int, int]:
        return key

    def _key(self, batch: StepBatch) -> Key | None:
        t, b = batch.num_tokens, batch.num_seqs
        if t > self.tokens[-1]:
            return None
        t_pad = next(x for x in self.tokens if x >= t)
        return t_pad, next((s for s in self.seqs if s >= b + (t_pad > t)), 0)

    def _launcher(self, key: Key):
        return self._context_free


class StepGraphs:
    """The executor's graphs: `decode` (DecodeGraphs) and `mixed` (MixedGraphs, None when the mixed
    program depends on a context), over one set of static buffers and, captured, one memory pool.

    decode, mixed: the programs (inputs, launcher) -> logits; the sizes are the executor's."""

    def __init__(self, decode: Program, mixed: Program, launcher, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, block_size: int, capture: bool, num_groups: int = 1, padding_slot: int = 0):
        sizes = capture_sizes(max_num_seqs)
        tokens, seqs = token_buckets(max_num_batched_tokens), sequence_buckets(sizes[-1])
        self.buffers = StepBuffers(launcher.device, tokens=max(tokens[-1], sizes[-1]), seqs=max(seqs[-1], sizes[-1]),
                                   width=_cdiv(max(max_model_len, tokens[-1]), block_size), block_size=block_size,
                                   num_groups=num_groups, padding_slot=padding_slot)
        self.decode = DecodeGraphs(decode, launcher, sizes, max_model_len=max_model_len, block_size=block_size,
                                   capture=False, num_groups=num_groups, buffers=self.buffers)
        self.mixed: MixedGraphs | None = None
        try:
            self.mixed = MixedGraphs(mixed, launcher, tokens, seqs, max_model_len=max_model_len,
                                     block_size=block_size, capture=False, num_groups=num_groups, buffers=self.buffers)
        except ContextDependentError as error:
            log.warning("mixed steps run eagerly: %s", error)
        log.info("CUDA graphs: decode %d batch sizes (%d..%d) x %d context buckets (%d..%d): %d graphs; %s",
                 len(sizes), sizes[0], sizes[-1], len(self.decode.contexts), self.decode.contexts[0],
                 self.decode.contexts[-1], len(self.decode.graph_keys),
                 "mixed eager" if self.mixed is None else
                 f"mixed {len(tokens)} token buckets ({tokens[0]}..{tokens[-1]}) x {len(seqs)} sequence buckets "
                 f"({seqs[0]}..{seqs[-1]}): {len(self.mixed.plans)} pairs, {len(self.mixed.graph_keys)} graphs")
        if capture:
            capture_graphs([family for family in (self.decode, self.mixed) if family is not None])

    @property
    def replays(self) -> int:
        """The steps that replayed a graph (ran the static buffers), decode and mixed."""
        return sum(family.replays for family in (self.decode, self.mixed) if family is not None)

    def family(self, batch: StepBatch) -> _BucketGraphs | None:
        """The graphs that `batch` replays: decode-only batches the decode graphs, the others the
        mixed ones; None (run it eagerly) when it fits no bucket."""
        family = self.decode if batch.is_decode_only else self.mixed
        return family if family is not None and family.fits(batch) else None


def _longest(batch: StepBatch) -> int:
    """The longest context of a batch (from its host seq_lens)."""
    return int(batch.seq_lens.max()) if batch.num_seqs else 0


def _tables(batch: StepBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A batch's (block table, slot mapping) of every cache group."""
    return [(batch.block_tables, batch.slot_mapping), *batch.group_tables]
