"""Tensor-parallel serving: one process per rank over torch.distributed (gloo on CPUs, NCCL on
GPUs), each running the artifact's step program on its own weight shards (`weights.rank<r>`).

Rank 0 runs the engine (scheduler, KV manager, sampler, server) over a `TensorParallelExecutor`:
each step it broadcasts the StepBatch to the other ranks (one small broadcast per step) and runs
its own shard; the programs meet in their collectives (runtime/collectives.py), and every rank
ends the step with the whole logits (lm_head's all_gather), of which rank 0 samples. The other
ranks run `serve_rank`: receive a batch, run it, until rank 0 sends None.

Launch. On one machine `start_ranks` spawns ranks 1..N-1 itself. Under torchrun (RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment), every process is given its rank by
the launcher: rank 0 serves, the others call `serve_rank`, and the same code runs across nodes.

A rank that dies takes the server down with a log line naming it instead of hanging: a watchdog
thread on rank 0 polls the ranks it spawned, and a collective whose peer is gone fails.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kiln.errors import KilnError
from kiln.runtime.collectives import DistComm

log = logging.getLogger("kiln.tensor_parallel")
WATCH_S = 1.0
TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting longer than this fails


@dataclass(frozen=True)
class RankSetup:
    """What every rank needs to build its executor: the artifact, whether it targets a GPU (a
    GpuExecutor: on the GPU, or interpreted when `executor_options["interpret"]`), and the
    executor's options. Picklable: spawned ranks receive it."""

    artifact: str
    tp: int
    gpu_artifact: bool
    executor_options: dict[str, Any] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        """Whether the ranks run on GPUs (one each, NCCL) rather than the CPU (gloo)."""
        return self.gpu_artifact and not self.executor_options.get("interpret")


def build_executor(setup: RankSetup, rank: int = 0, comm: DistComm | None = None, artifact=None):
    """Rank `rank`'s executor over its shard of the artifact (`artifact`: already loaded; else
    loaded without hashing its files, which rank 0 checks)."""
    from kiln.runtime.artifact import load_artifact

    artifact = artifact or load_artifact(setup.artifact, check_hashes=False)
    if setup.gpu_artifact:
        if setup.executor_options.get("interpret"):
            from kiln.process import enable_interpreter

            enable_interpreter()  # before the first triton import
        from kiln.runtime.gpu_executor import GpuExecutor  # imports triton

        return GpuExecutor(artifact, rank=rank, comm=comm, **setup.executor_options)
    from kiln.runtime.executor import CpuExecutor

    return CpuExecutor(artifact, rank=rank, comm=comm, **setup.executor_options)


def check_degree(tp: int, artifact_tp: int, gpu: bool) -> None:
    """Refuse, before any process starts, a degree the artifact was not sharded for or that this
    machine's GPUs cannot hold (one GPU per rank)."""
    if tp != artifact_tp:
        raise KilnError(f"--tp {tp}, but the artifact was compiled for tensor-parallel degree {artifact_tp}: pass "
                        f"--tp {artifact_tp}, or compile with --tp {tp}")
    on_this_node = int(os.environ.get("LOCAL_WORLD_SIZE", tp))  # torchrun's ranks on this node; else all of them
    if gpu and on_this_node > torch.cuda.device_count():
        raise KilnError(f"--tp {tp} needs one GPU per rank ({on_this_node} on this machine), and "
                        f"{torch.cuda.device_count()} are visible: give a degree of at most {torch.cuda.device_count()} "
                        "(compiled for it), start the ranks on several nodes with torchrun, or make more GPUs visible")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_group(rank: int, size: int, gpu: bool) -> DistComm:
    """Join the process group named by MASTER_ADDR / MASTER_PORT (torchrun's variables). On a CPU
    the ranks share the machine's cores (each takes its share of the threads)."""
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=size, timeout=TIMEOUT)
    return DistComm()


def _rank_main(rank: int, setup: RankSetup, environment: dict[str, str]) -> None:
    """A spawned rank: join the group, build the executor, serve rank 0's steps. It ignores
    Ctrl-C and SIGTERM, which a terminal or `timeout` sends to the whole process group: rank 0
    drains and then stops it (if rank 0 dies instead, the rank's next broadcast fails)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(environment)
    run_rank(rank, setup)


def run_rank(rank: int, setup: RankSetup) -> None:
    """Rank `rank` > 0 (spawned here, or started by torchrun): join the group, build its executor,
    serve rank 0's steps until rank 0 stops."""
    serve_rank(build_executor(setup, rank, _init_group(rank, setup.tp, setup.on_gpu)))


def serve_rank(executor) -> None:
    """A rank other than 0: agree on the pool size, then run each step rank 0 broadcasts, until None."""
    _agree(executor)
    while True:
        message: list = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            break
        executor.execute(message[0])
    dist.destroy_process_group()


def _agree(executor) -> tuple[int, int, int]:
    """The KV blocks, context and recurrent-state slots every rank can hold: the smallest of the
    ranks' (equal on equal machines; a smaller GPU memory measurement on one rank bounds them
    all). The executor then takes the context (and builds its step graphs on it: `join_group`)."""
    sizes = torch.tensor([executor.num_blocks, executor.max_model_len, executor.num_state_slots], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        sizes = sizes.cuda()
    dist.all_reduce(sizes, op=dist.ReduceOp.MIN)
    num_blocks, max_model_len, num_state_slots = map(int, sizes.tolist())
    executor.join_group(max_model_len)
    return num_blocks, max_model_len, num_state_slots


class TensorParallelExecutor:
    """Rank 0's executor: broadcasts each step to the other ranks, then runs its own shard. The
    engine sees one executor of the agreed pool size."""

    def __init__(self, local, processes: list, on_rank_failure: Callable[[str], None] | None = None,
                 threads_before: int | None = None):
        self.local = local
        self._threads_before = threads_before
        self.processes = processes
        self.block_size, self.vocab_size = local.block_size, local.vocab_size
        self.cache_groups = local.cache_groups
        self.num_host_blocks = getattr(local, "num_host_blocks", 0)
        self._closed = False
        self._on_rank_failure = on_rank_failure or _exit_server
        if processes:  # watching before the agreement: a rank that dies building its graphs is reported
            threading.Thread(target=self._watch, name="kiln-tp-watchdog", daemon=True).start()
        self.num_blocks, self.max_model_len, self.num_state_slots = _agree(local)

    def execute(self, batch):
        dist.broadcast_object_list([batch], src=0)
        return self.local.execute(batch)

    def close(self) -> None:
        """Stop the other ranks (they leave their loop) and wait for the spawned ones."""
        if self._closed:
            return
        self._closed = True
        try:
            dist.broadcast_object_list([None], src=0)
        except RuntimeError as e:  # a rank already gone: nothing left to stop there
            log.warning("stopping tensor parallelism: a rank had already stopped (%s)", str(e).splitlines()[0])
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        dist.destroy_process_group()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)

    def _watch(self) -> None:
        while not self._closed:
            for rank, process in enumerate(self.processes, start=1):
                if process.exitcode is not None and not self._closed:
                    self._on_rank_failure(f"tensor-parallel rank {rank} (pid {process.pid}) exited with code "
                                          f"{process.exitcode}; stopping, since the model needs every rank")
                    return
            threading.Event().wait(WATCH_S)


def _exit_server(message: str) -> None:
    log.error("%s", message)
    os._exit(1)


def start_ranks(setup: RankSetup, on_rank_failure: Callable[[str], None] | None = None) -> TensorParallelExecutor:
    """Rank 0's executor, with ranks 1..tp-1 spawned on this machine (or, under torchrun, already
    started by the launcher with their RANK: only rank 0 may call this)."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and int(os.environ["RANK"]) != 0:
        raise KilnError("start_ranks runs on rank 0; the other ranks call serve_rank")
    environment = {"MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                   "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))}
    os.environ.update(environment)
    processes = []
    if not launched:
        context = multiprocessing.get_context("spawn")
        for rank in range(1, setup.tp):
            process = context.Process(target=_rank_main, args=(rank, setup, {**environment, "LOCAL_RANK": str(rank)}),
                                      name=f"kiln-rank-{rank}", daemon=True)
            process.start()
            processes.append(process)
    log.info("tensor parallelism: %d ranks (%s)", setup.tp, "launched by torchrun" if launched else "spawned here")
    threads_before = torch.get_num_threads()
    comm = _init_group(0, setup.tp, setup.on_gpu)
    return TensorParallelExecutor(build_executor(setup, 0, comm), processes, on_rank_failure, threads_before)
