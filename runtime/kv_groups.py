"""What each cache group (ir/cache_groups.py) keeps of a sequence, and the KV tensors of all groups.

`GroupPolicy` answers, for one group, which logical KV blocks of a sequence queries at positions
>= p can still read: a full group all of them; a sliding-window group those from
`first_kept(p)` on; a block-sparse group those from `first_kept(p)` on (the local blocks of p's
query block) plus every vertical block before them. The KV manager releases the others.

`allocate_kv_states` builds the executor's cache tensors: one tensor per slot, shared by the i-th
state of every group, [num_blocks, *page]; a block id is one page in each of its group's states.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kiln.contract import BLOCK_SPARSE, DTYPES, FULL, SLIDING_WINDOW, CacheGroup
from kiln.errors import KilnError

KINDS = (FULL, SLIDING_WINDOW, BLOCK_SPARSE)


class GroupPolicy:
    """The blocks one group keeps. Logical block i holds positions [i * bs, (i + 1) * bs)."""

    def __init__(self, group: CacheGroup):
        if group.kind not in KINDS:
            raise KilnError(f"the artifact has a cache group of kind {group.kind!r}, which this kiln cannot serve "
                            f"(it serves {', '.join(KINDS)}); recompile it with this kiln")
        self.kind, self.block_size = group.kind, group.block_size
        self.window, self.layout = group.window, group.layout
        self.bounded = group.kind != FULL

    def first_kept(self, position: int) -> int:
        """The first logical block that queries at positions >= `position` read in full runs (for
        block-sparse: the first local block); blocks before it are released unless `keeps_always`."""
        if self.kind == SLIDING_WINDOW:
            return max(0, position - self.window + 1) // self.block_size
        if self.kind == BLOCK_SPARSE:
            layout = self.layout
            return layout.first_local_block(position // layout.block_size) * layout.block_size // self.block_size
        return 0

    def keeps_always(self, block: int) -> bool:
        """Whether every later query reads logical block `block` (a block-sparse vertical block)."""
        return self.kind == BLOCK_SPARSE and bool(self.layout.sees(1 << 62, block * self.block_size // self.layout.block_size))

    def read_blocks(self, position: int, num_blocks: int) -> list[int]:
        """The logical blocks among the first `num_blocks` that queries at positions >= `position`
        read: a block-sparse layout's vertical blocks before `first_kept(position)`, then every
        block from it on."""
        first = min(self.first_kept(position), num_blocks)
        vertical = []
        if self.kind == BLOCK_SPARSE:  # layout blocks j with (j + 1) % stride == 0, each `per` KV blocks
            per, stride = self.layout.block_size // self.block_size, self.layout.vertical_stride
            vertical = [b for j in range(stride - 1, first // per, stride) for b in range(j * per, (j + 1) * per)]
        return vertical + list(range(first, num_blocks))

    def blocks_held(self, start: int, end: int) -> int:
        """Blocks a sequence holds while positions [start, end) are computed (0 <= start < end):
        len(read_blocks(start, ...)), counted without listing them."""
        num_blocks = -(-end // self.block_size)
        first = min(self.first_kept(start), num_blocks)
        vertical = 0
        if self.kind == BLOCK_SPARSE:
            per, stride = self.layout.block_size // self.block_size, self.layout.vertical_stride
            vertical = len(range(stride - 1, first // per, stride)) * per
        return vertical + num_blocks - first


def blocks_needed(policies: list[GroupPolicy], length: int, chunk: int) -> int:
    """Blocks one sequence of `length` tokens needs at its peak, all groups together, when it is
    computed in chunks of up to `chunk` tokens (the peak is its last chunk, or its last decode)."""
    start = max(0, length - max(1, chunk))
    return sum(policy.blocks_held(start, length) for policy in policies)


def capacity_tokens(policies: list[GroupPolicy], num_blocks: int, chunk: int = 1, limit: int = 1 << 24) -> int:
    """The longest sequence (up to `limit` tokens) whose peak need fits `num_blocks` blocks."""
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        if blocks_needed(policies, mid, chunk) <= num_blocks:
            low = mid
        else:
            high = mid - 1
    return low


def slot_pages(groups: list[CacheGroup]) -> list[tuple[int, ...]]:
    """The page shape of each slot tensor: the states of the group that has the most."""
    return list(max(groups, key=lambda g: len(g.states)).pages) if groups else []


def block_bytes(groups: list[CacheGroup]) -> int:
    """Bytes one block id takes over all slot tensors (0 without groups)."""
    if not groups:
        return 0
    widest = max(groups, key=lambda g: len(g.states))
    return sum(widest.page_bytes(i) for i in range(len(widest.states)))


def allocate_kv_states(groups: list[CacheGroup], num_blocks: int, device) -> dict[str, torch.Tensor]:
    """Zeroed cache tensors, state name -> [num_blocks, *page]: the i-th state of every group is a
    view of slot tensor i."""
    if not groups:
        return {}
    dtype = DTYPES[groups[0].dtype]
    slots = [zeros((num_blocks, *page), dtype, torch.device(device)) for page in slot_pages(groups)]
    return {name: slots[i] for group in groups for i, name in enumerate(group.states)}


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros, but on the CPU from calloc (numpy's zeros): the OS maps zeroed pages on first
    touch, so a cache of gigabytes costs neither start-up time nor resident memory until used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(size, dtype=np.uint8)).view(dtype).view(shape)


def manifest_groups(manifest: dict) -> list[CacheGroup]:
    """The artifact's cache groups, each checked to be a kind this runtime serves (none for a model
    whose layers are all recurrent)."""
    groups = [CacheGroup.from_json(g) for g in manifest["cache_groups"]]
    for group in groups:
        GroupPolicy(group)
    return groups


def capacity_line(groups: list[CacheGroup], num_blocks: int) -> str:
    """The start-up log line: the pool, and the longest sequence it holds (and would hold if every
    layer kept its whole context)."""
    if not groups:
        return "KV cache: none (no attention layers)"
    policies = [GroupPolicy(g) for g in groups]
    pool_bytes = num_blocks * block_bytes(groups)
    all_full = pool_bytes // sum(g.bytes_per_token for g in groups)
    return (f"KV cache: {num_blocks} blocks of {groups[0].block_size} tokens ({pool_bytes / 2**20:.0f} MiB) in "
            f"{len(groups)} cache group(s) [{', '.join(describe_group(g) for g in groups)}]: capacity "
            f"{capacity_tokens(policies, num_blocks)} tokens for one sequence ({all_full} if every layer kept its "
            "whole context)")


def describe_group(group: CacheGroup) -> str:
    """e.g. "3 layers window 512"."""
    what = {FULL: "full", SLIDING_WINDOW: f"window {group.window}", BLOCK_SPARSE: f"block-sparse {group.layout}"}
    return f"{len(group.layers)} layers {what[group.kind]}"
