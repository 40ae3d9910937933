"""What a generated GPU step program calls at run time besides its launcher: plain functions of ints.

`kiln compile` resolves every kernel choice ahead of time, so a GPU artifact's `program.<phase>.py`
holds its kernels as `Kernel` records (a name and a grid function of the step's sizes) and needs
only this module, the launcher and torch: serving an artifact never imports the compiler. The
compiler's kernel modules call the same functions (one definition of each rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln.contract import BlockSparseLayout

# Split-K decode (flash-decoding): at most this many context splits, each of at least this many
# keys (below it a split's fixed cost, the query load, the partial write and the reduce, dominates).
MAX_DECODE_SPLITS = 32
MIN_SPLIT_TOKENS = 256


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Kernel:
    """One kernel of an artifact as its step program launches it.

    name: the kernel's name (kernels/<name>.py, binaries/<name>.*, its manifest entry);
    grid: the launch grid from the step sizes the program passes (rows, tokens, splits, ...);
    scratch: for a kernel that reduces across programs (split-K GEMM), the sizes of its scratch
    for those step sizes: (fp32 values of partial results, int32 counters that the kernel leaves
    at zero); None for every other kernel.
    """

    name: str
    grid: Callable[..., tuple[int, ...]]
    scratch: Callable[..., tuple[int, int]] | None = None


def bucket(rows: int, decode: int, small: int) -> str:
    """A kernel's tile bucket by the rows (tokens) of the step: "decode" up to `decode` rows,
    "small" up to `small`, else "large"."""
    if rows <= decode:
        return "decode"
    return "small" if rows <= small else "large"


def visible_keys(context: int, window: int | None, block_sparse: tuple[int, int, int] | None) -> int:
    """How many keys the query at position context - 1 sees: the context, clipped by a sliding
    window, or the blocks a block-sparse layout (block size, local blocks, vertical stride) shows."""
    if window is not None:
        return min(context, window)
    if block_sparse is None or context == 0:
        return context
    layout = BlockSparseLayout(*block_sparse)
    local_block = layout.first_local_block((context - 1) // layout.block_size)
    return (local_block // layout.vertical_stride - local_block) * layout.block_size + context


def decode_splits(batch: int, num_kv_heads: int, keys: int, sm_count: int | None) -> int:
    """How many context chunks split-K decode uses; 1 means "launch without split-K".

    Without splitting a step runs batch * num_kv_heads programs. When that already covers the
    SMs (or there are none: cpu), 1. Otherwise enough splits to give every SM a program,
    ceil(sm_count / programs), but no more than keeps each split MIN_SPLIT_TOKENS of the `keys`
    the longest sequence's query sees (`visible_keys`), and at most MAX_DECODE_SPLITS.
    """
    programs = batch * num_kv_heads
    if not sm_count or programs == 0 or programs >= sm_count:
        return 1
    return max(1, min(cdiv(sm_count, programs), keys // MIN_SPLIT_TOKENS, MAX_DECODE_SPLITS))


def combine_pairs(pairs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A mixture of experts' combine: out [T, N] = the sum over each token's top_k rows of pairs
    [T * top_k, N] (one torch reduction on the device, fp32 accumulation for half types)."""
    return torch.sum(pairs.view(out.shape[0], -1, out.shape[1]), dim=1, out=out)
