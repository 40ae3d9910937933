"""How each rank of a tensor-parallel group gets its weights, as data: the sharding pass
(passes/shard.py) puts one of these on every param and state that a rank does not hold whole,
as its `shard` attribute; the graph's types are one rank's. No tensor is touched until
`shard_weights` cuts rank r's weights out of the full ones (the compiler, per rank; tests).

  CutDim(dim, segments, ranks)  the tensor is cut along `dim`, made of segments (size, parts)
                                laid end to end; each segment is cut into `parts` equal blocks and
                                rank r holds block r * parts // ranks of each, so parts < ranks
                                means groups of ranks hold the same block (replicated KV heads).
                                A quantized weight (kiln/quant.py) is cut still quantized: its rows
                                anywhere, its columns in whole groups of its format, or anywhere in
                                a format with one (s, z) per row, whose group becomes the rank's
                                columns (`quantized_cut`)
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
from kiln.quant import QuantFormat, QuantizedTensor, Weight


@dataclass(frozen=True)
class CutDim:
    dim: int
    segments: tuple[tuple[int, int], ...]  # (size, parts) along `dim`, in order
    ranks: int

    def local_size(self) -> int:
        """The size of `dim` on one rank (the caller checked that every part divides its segment)."""
        return sum(size // parts for size, parts in self.segments)

    def spans(self, rank: int) -> list[tuple[int, int]]:
        """(start, length) along `dim` of the blocks rank `rank` holds, in order."""
        spans, start = [], 0
        for size, parts in self.segments:
            block = size // parts
            spans.append((start + (rank * parts // self.ranks) * block, block))
            start += size
        return spans

    def take(self, full: Weight, rank: int) -> Weight:
        """Rank `rank`'s cut of `full` (the whole tensor; a quantized weight stays quantized)."""
        if full.shape[self.dim] != sum(size for size, _ in self.segments):
            raise KilnError(f"a weight of shape {tuple(full.shape)} cannot be cut as {self}: the weights do not belong "
                            "to the sharded graph")
        if isinstance(full, QuantizedTensor):
            return _take_quantized(self, full, rank)
        return torch.cat([full.narrow(self.dim, start, n) for start, n in self.spans(rank)], dim=self.dim).contiguous()

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


def quantized_cut(fmt: QuantFormat, shape: tuple[int, int], cut: CutDim) -> QuantFormat:
    """The format of a rank's cut of a `fmt` weight of `shape` (see the module docstring), or a
    KilnError saying why the weight cannot be cut quantized."""
    if cut.dim == 0:
        return fmt
    rows, cols = shape
    local = cut.local_size()
    if fmt.group == cols and fmt.kind != "int4":  # one (s, z) per row: every column shares it
        return QuantFormat(fmt.kind, local, fmt.scale_dtype)
    if all(start % fmt.group == 0 and n % fmt.group == 0 for start, n in cut.spans(0)):  # spans(r): shifts by blocks
        return fmt
    blocks = ", ".join(str(n) for _, n in cut.spans(0))
    raise KilnError(f"a {fmt} weight of {cols} columns cannot be cut into blocks of {blocks} columns for {cut.ranks} "
                    f"ranks: the blocks must hold whole groups of {fmt.group}. Compile with "
                    "--dequantize (or without --quant), or with a tensor-parallel degree whose blocks do")


def _take_quantized(cut: CutDim, full: QuantizedTensor, rank: int) -> QuantizedTensor:
    """`cut.take` of a quantized weight: its codes and (s, z) pairs cut as `quantized_cut` allows."""
    fmt = quantized_cut(full.format, full.shape, cut)
    spans = cut.spans(rank)
    if cut.dim == 0:
        parts = [full.rows(slice(start, start + n)) for start, n in spans]
        return QuantizedTensor(fmt, torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]))
    per_byte = fmt.codes_per_byte()
    qweight = torch.cat([full.qweight[:, start // per_byte:(start + n) // per_byte] for start, n in spans], dim=1)
    if fmt.group != full.format.group:  # one pair per row, shared by the rank's columns
        return QuantizedTensor(fmt, qweight.contiguous(), full.scales.clone())
    g = fmt.group
    scales = torch.cat([full.scales[:, start // g:(start + n) // g] for start, n in spans], dim=1)
    return QuantizedTensor(fmt, qweight.contiguous(), scales.contiguous())


def shard_weights(graph: Graph, weights: Mapping[str, Weight], rank: int) -> dict[str, Weight]:
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
        out[param.name] = full if shard is None else shard.take(full, rank)
    return out
