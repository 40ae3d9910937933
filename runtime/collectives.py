"""The collectives a tensor-parallel step program calls (the IR's all_reduce and all_gather,
passes/shard.py), through an explicit communicator that the executor passes to the program:
`program.step(inputs, weights, states[, launcher], comm)`.

`Comm` is what a program needs of it; `DistComm` is the one kiln runs with, over a
torch.distributed process group (gloo on CPUs, NCCL on GPUs; runtime/tensor_parallel.py starts
it); `DryComm` communicates nothing, for the dry runs that plan CUDA graphs. The collectives
return new tensors and leave their input alone.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist


class Comm(Protocol):
    """One rank's view of its tensor-parallel group of `size` ranks."""

    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (same shape and dtype on every rank; summed in fp32)."""
        ...

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, in rank order."""
        ...


class DistComm:
    """`Comm` over torch.distributed's default process group (initialized by the caller)."""

    def __init__(self):
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        total = x.to(torch.float32, copy=True)
        dist.all_reduce(total)
        return total.to(x.dtype)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=dim)


class DryComm:
    """`Comm` for a dry run of a step (runtime/cuda_graphs.py plans a bucket's launches with a
    launcher that runs nothing): outputs of the shape and dtype the collectives give, unfilled,
    and no communication (a rank's dry runs must not wait for the others')."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] *= self.size
        return x.new_empty(shape)
