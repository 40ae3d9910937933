"""CPU step graphs: a decode step recorded as the C kernel calls it makes, replayed by one C call.

What CUDA graphs are to a GPU step, for the cpu target. At batch 1 a SmolLM2-135M decode step runs
~300 C kernels (linears, rms_norm, rope + KV writes, attention...) of a few to a hundred
microseconds each, and the generated Python program around them (argument checks, allocation,
views, ctypes) cost about as much again: each call ~10-25 us, its interpreter state evicted from
the caches by the ~100 MB of weights the step streams. A `CpuGraph` runs the program once on
static input tensors while `Kernel` records every call (adapter address + arguments), keeps every
tensor the step allocated alive, and from then on a step copies its inputs into the static tensors
and runs the recorded calls in C (`kiln_replay`, the step-op library): the same kernels on the same
addresses, so its logits are bit-identical to the program's.

A graph is valid only if the program's work is all C calls: while it is captured a torch function
mode refuses every torch function but allocations, views and metadata (a torch op would be frozen
at its capture values); a program that runs one (dense fp32 linears on oneDNN, ops without C kernels) is not
captured and runs as Python. Graphs are per batch size, up to `MAX_BATCH`; each holds its own
activations (~5 MB per sequence for SmolLM2). A replay whose kernel reports an error (a slot or
id out of range, a negative slot) stops there and the step runs as Python, which raises or
handles it.
"""

from __future__ import annotations

import ctypes
import logging
import math
import struct
from collections.abc import Callable, Mapping

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger("kiln.cpu_graph")

MAX_BATCH = 8  # decode steps of up to this many sequences run as graphs (beyond, the kernels dominate)
# what a captured program may do in torch (TorchFunctionMode names): read metadata, allocate, take
# views; no computation, no reading of values
_ALLOWED = {"__get__", "data_ptr", "dim", "size", "stride", "numel", "is_contiguous", "untyped_storage",
            "empty", "empty_like", "new_empty", "narrow", "view", "select", "t", "transpose", "unsqueeze", "squeeze",
            "unbind", "split", "expand", "as_strided"}
_ALLOCATING = {"empty", "empty_like", "new_empty"}
_VIEW_IF_POSSIBLE = {"reshape", "contiguous", "flatten", "__getitem__"}  # allowed where they return a view


class NotCapturable(Exception):
    """The program ran a torch op that computes: it cannot be replayed from recorded C calls."""


class Recorder:
    """The calls a capture records (adapter address, int64 arguments) and the tensors it keeps alive."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []
        self.tensors: list[torch.Tensor] = []


recording: Recorder | None = None  # set while a graph is captured


class Kernel:
    """A C function of a kernel library with its replay adapter: calling it runs the function (and,
    while a graph is captured, records the call). `name` is the function's symbol, kiln_<op>; the
    adapter is kiln_op_<op> (templates/cpu_step_ops.c.j2's header)."""

    __slots__ = ("fn", "adapter", "floats")

    def __init__(self, cdll: ctypes.CDLL, name: str, argtypes: tuple, restype):
        self.fn = getattr(cdll, name)
        self.fn.argtypes, self.fn.restype = argtypes, restype
        self.adapter = ctypes.cast(getattr(cdll, "kiln_op_" + name.removeprefix("kiln_")), ctypes.c_void_p).value
        self.floats = tuple(i for i, kind in enumerate(argtypes) if kind is ctypes.c_float)

    def __call__(self, *args):
        if recording is not None:
            recording.calls.append((self.adapter, [_as_int64(a, i in self.floats) for i, a in enumerate(args)]))
        return self.fn(*args)


def _as_int64(value, is_float: bool) -> int:
    if is_float:
        return struct.unpack("<q", struct.pack("<d", value))[0]
    return 0 if value is None else int(value)


class _CaptureMode(TorchFunctionMode):
    """Keeps every tensor the program allocates alive (the recorded calls point into them) and
    refuses torch functions that compute or read values. (A TorchFunctionMode: a dispatch mode's
    first op imports torch._dynamo and sympy, ~125 MB of resident memory.)"""

    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name not in _ALLOWED and name not in _VIEW_IF_POSSIBLE:
            raise NotCapturable(name)
        out = func(*args, **(kwargs or {}))
        if name in _VIEW_IF_POSSIBLE and not (isinstance(out, torch.Tensor) and isinstance(args[0], torch.Tensor) and
                                              out.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr()):
            raise NotCapturable(f"{name} (a copy)")
        if name in _ALLOCATING:
            self.recorder.tensors.append(out)
        return out


class CpuGraph:
    """One decode program captured at one batch size (`capture`): `replay` runs a step of that size."""

    def __init__(self, static: dict[str, torch.Tensor], logits: torch.Tensor, recorder: Recorder, replay_fn: Callable):
        self.static, self.logits, self.replay_fn = static, logits, replay_fn
        self.tensors = recorder.tensors  # what the recorded calls point into
        self.args = torch.tensor([a for _, args in recorder.calls for a in args], dtype=torch.int64)
        ops, at = [], self.args.data_ptr()
        for adapter, args in recorder.calls:  # kiln_replay's {adapter, args} records
            ops.append((adapter, at))
            at += 8 * len(args)
        self.ops = torch.tensor(ops, dtype=torch.int64)

    @classmethod
    def capture(cls, program, inputs: Mapping[str, torch.Tensor], weights, states, table_width: int,
                replay_fn: Callable) -> tuple[CpuGraph, torch.Tensor]:
        """Runs `program` on `inputs` (copied into static tensors, block tables `table_width` wide)
        while recording its calls: the graph and this step's logits. Raises NotCapturable (the step
        may be half done: rerun it as Python; its KV writes are idempotent)."""
        global recording
        static = {name: _static_like(name, value, table_width) for name, value in inputs.items()}
        _copy_inputs(static, inputs)
        recorder = recording = Recorder()
        try:
            with _CaptureMode(recorder):
                logits = program.step(static, weights, states)["logits"]
        finally:
            recording = None
        if not recorder.calls:
            raise NotCapturable("no C kernel calls")
        return cls(static, logits, recorder, replay_fn), logits

    def replay(self, inputs: Mapping[str, torch.Tensor], threads: int) -> torch.Tensor | None:
        """This step's logits (the graph's own buffer, overwritten by the next replay), or None if a
        kernel reported an error (run the step as Python)."""
        _copy_inputs(self.static, inputs)
        failed = self.replay_fn(self.ops.data_ptr(), self.ops.shape[0], threads)
        return None if failed else self.logits


def _copy_inputs(static: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> None:
    for name, value in inputs.items():
        if static[name].shape != value.shape:  # a block table, narrower this step
            static[name][:, :value.shape[1]].copy_(value)
        else:
            static[name].copy_(value)


def _static_like(name: str, value: torch.Tensor, table_width: int) -> torch.Tensor:
    """A step input's static tensor: block tables as wide as the longest context needs."""
    if value.dim() == 2 and name.startswith("block_tables"):
        return torch.zeros((value.shape[0], max(table_width, value.shape[1])), dtype=value.dtype)
    return torch.empty_like(value)


def table_width(max_model_len: int, block_size: int) -> int:
    return math.ceil(max_model_len / block_size)


class CpuGraphs:
    """An executor's decode graphs, one per batch size (and input shapes), captured at first use;
    `run` returns a step's logits, or None where the step must run as Python."""

    def __init__(self, replay_fn: Callable, table_width: int):
        self.replay_fn, self.table_width = replay_fn, table_width
        self.graphs: dict[tuple, CpuGraph] = {}
        self.capturable = True

    def run(self, program, inputs: Mapping[str, torch.Tensor], weights, states, threads: int) -> torch.Tensor | None:
        if not self.capturable or inputs["input_ids"].shape[0] > MAX_BATCH:
            return None
        key = tuple((name, tuple(v.shape) if not name.startswith("block_tables") else v.shape[0])
                    for name, v in inputs.items())
        graph = self.graphs.get(key)
        if graph is not None:
            return graph.replay(inputs, threads)
        try:
            graph, logits = CpuGraph.capture(program, inputs, weights, states, self.table_width, self.replay_fn)
        except NotCapturable as e:
            log.info("decode steps run as Python: the program runs torch op %s, which a CPU step graph cannot replay", e)
            self.capturable = False
            return None
        self.graphs[key] = graph
        return logits
