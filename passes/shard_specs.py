"""How each rank of a tensor-parallel group gets its weights, as data: the sharding pass
(passes/shard.py) puts one of these on every param and state that a rank does not hold whole,
as its `shard` attribute; the graph's types are one rank's. No tensor is touched until
`shard_weights` cuts rank r's weights out of the full ones (the compiler, per rank; tests).

  CutDim(dim, segments, ranks)  the tensor is cut along `dim`, made of segments (size, parts)
                                laid end to end; each segment is cut into `parts` equal blocks and
                                rank r holds block r * parts // ranks of each, so parts < ranks
                                means groups of ranks hold the same block (replicated KV heads)
  FirstRank()                   rank 0 holds the tensor, the others zeros: the bias of a linear
                                whose output is summed over the ranks (added once)
  RankOffset(block)             no checkpoint tensor: the i32 scalar rank * block, where the rank's
                                slice of a vocabulary starts (its vocab-parallel embedding)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kiln.errors import KilnError
from kiln.ir import Graph
from kiln.quant import QuantizedTensor, Weight


@dataclass(frozen=True)
class CutDim:
    dim: int
    segments: tuple[tuple[int, int], ...]  # (size, parts) along `dim`, in order
    ranks: int

    def local_size(self) -> int:
        """The size of `dim` on one rank (the caller checked that every part divides its segment)."""
        return sum(size // parts for size, parts in self.segments)

    def take(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s cut of `full` (the whole tensor)."""
        if full.shape[self.dim] != sum(size for size, _ in self.segments):
            raise KilnError(f"a weight of shape {tuple(full.shape)} cannot be cut as {self}: the weights do not belong "
                            "to the sharded graph")
        pieces, start = [], 0
        for size, parts in self.segments:
            block = size // parts
            pieces.append(full.narrow(self.dim, start + (rank * parts // self.ranks) * block, block))
            start += size
        return torch.cat(pieces, dim=self.dim).contiguous()

    def join(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The whole tensor from every rank's cut (in rank order): `take`'s inverse."""
        pieces, start = [], 0
        for size, parts in self.segments:
            block = size // parts
            pieces += [shards[b * self.ranks // parts].narrow(self.dim, start, block) for b in range(parts)]
            start += block
        return torch.cat(pieces, dim=self.dim)

    def __str__(self) -> str:
        return f"cut(dim={self.dim}, {' + '.join(f'{s}/{p}' for s, p in self.segments)} of {self.ranks})"


@dataclass(frozen=True)
class FirstRank:
    def take(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        return full if rank == 0 else torch.zeros_like(full)

    def __str__(self) -> str:
        return "rank 0"


@dataclass(frozen=True)
class RankOffset:
    block: int

    def take(self, full: None, rank: int) -> torch.Tensor:
        return torch.tensor(rank * self.block, dtype=torch.int32)

    def __str__(self) -> str:
        return f"rank*{self.block}"


WeightShard = CutDim | FirstRank | RankOffset


def shard_weights(graph: Graph, weights: Mapping[str, Weight], rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensor for every param of a sharded `graph` (passes/shard.py), by name, cut
    from the full `weights` (the checkpoint's, by the same names: sharding runs on the traced
    graph, before any pass derives weights)."""
    out = {}
    for param in graph.params:
        shard = param.attrs.get("shard")
        if isinstance(shard, RankOffset):
            out[param.name] = shard.take(None, rank)
            continue
        if param.name not in weights:
            raise KilnError(f"the weights have no tensor {param.name!r}, which the sharded graph needs: load the "
                            "checkpoint that the graph was traced from")
        full = weights[param.name]
        if isinstance(full, QuantizedTensor):
            raise KilnError(f"weight {param.name!r} is stored quantized ({full.format}): tensor parallelism does not "
                            "cut quantized weights yet; dequantize them (--dequantize) or use tp 1")
        out[param.name] = full if shard is None else shard.take(full, rank)
    return out
