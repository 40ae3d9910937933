"""The host tier of the prefix cache: KV blocks that the device pool evicts are copied to host
memory, and a later prefix hit on them is copied back instead of recomputed (as SGLang's
hierarchical cache and vLLM's KV offloading do).

The tier is inclusive: a block copied back stays in it, so evicting that block again from the
device pool costs no copy. `HostTier` is its bookkeeping, kept by the KV manager: (cache group,
chain hash) -> host block, least recently used evicted first, except blocks of a request that
asked to keep its prefix warm (`keep`, a request's `cache_ttl`) until that time passes, and
blocks pinned while a hit is being copied back. `HostBlocks` is its memory, owned by the
executor: one host tensor per slot tensor of the device pool, [num_blocks, *page], pinned when
the pool is on a GPU. The copies (`BlockCopy`) are queued by the KV manager while it schedules a
step and run by the executor, in order, before the step: each run of copies in one direction is
one gather and one scatter per slot tensor. On a GPU, loads are queued on the stream (the step's
kernels follow them without a host wait); offloads wait for their device-to-host copy.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kiln.errors import KilnError
from kiln.runtime.kv_groups import zeros

log = logging.getLogger("kiln.kv_tiers")


@dataclass(frozen=True)
class BlockCopy:
    """One block copied between the device pool and the host tier (to_host: an offload)."""

    to_host: bool
    device_block: int
    host_block: int


class HostTier:
    """Which (cache group, hash) key each of `num_blocks` host blocks holds."""

    def __init__(self, num_blocks: int, clock: Callable[[], float] = time.monotonic):
        self.num_blocks = num_blocks
        self.clock = clock
        self._free = list(range(num_blocks - 1, -1, -1))
        self._blocks: OrderedDict[Hashable, int] = OrderedDict()  # least recently used first
        self._keep_until: dict[Hashable, float] = {}
        self._pinned: set[int] = set()

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, key: Hashable) -> int | None:
        """The host block holding `key`, if any (pure)."""
        return self._blocks.get(key)

    def use(self, key: Hashable) -> None:
        """Mark `key` recently used (a hit copied it back)."""
        self._blocks.move_to_end(key)

    def save(self, key: Hashable) -> int | None:
        """The host block to copy an evicted device block of `key` into, evicting the least
        recently used evictable entry when none is free; None when the tier already holds `key`
        (it becomes recently used) or holds only kept and pinned blocks."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return None
        if not self._free and not self._evict_one():
            return None
        self._blocks[key] = block = self._free.pop()
        return block

    def _evict_one(self) -> bool:
        now = self.clock()
        for key, block in self._blocks.items():
            if block not in self._pinned and self._keep_until.get(key, now) <= now:
                del self._blocks[key]
                self._keep_until.pop(key, None)
                self._free.append(block)
                return True
        return False

    def drop(self, host_block: int) -> None:
        """Forget the entry in `host_block` (its copy never ran)."""
        key = next((k for k, b in self._blocks.items() if b == host_block), None)
        if key is not None:
            del self._blocks[key]
            self._free.append(host_block)

    def keep(self, keys: Iterable[Hashable], until: float) -> None:
        """Evict none of `keys` (on the device now, or here) before time `until` (on `clock`)."""
        for key in keys:
            self._keep_until[key] = max(until, self._keep_until.get(key, until))
        if len(self._keep_until) > 2 * self.num_blocks:  # forget the hints that expired
            now = self.clock()
            self._keep_until = {k: t for k, t in self._keep_until.items() if t > now}

    @contextmanager
    def pinned(self, host_blocks: Iterable[int]) -> Iterator[None]:
        """While a hit's blocks are queued to be copied back, `save` must not reuse them."""
        self._pinned = set(host_blocks)
        try:
            yield
        finally:
            self._pinned = set()


def allocate_host_tier(kv_states: dict[str, torch.Tensor], host_cache_memory: int) -> HostBlocks | None:
    """The host tier's memory for the device pool `kv_states` in `host_cache_memory` bytes (None
    for 0 bytes, or a model without KV); KilnError when that is more than the machine has
    available (it would swap, or be killed, rather than beat recomputing)."""
    tensors = list({id(t): t for t in kv_states.values()}.values())
    block_bytes = sum(t[0].nbytes for t in tensors)
    if host_cache_memory <= 0 or not block_bytes:
        return None
    available = _available_memory()
    if available is not None and host_cache_memory > available:
        raise KilnError(f"the host KV tier asks for {host_cache_memory / 2**30:.2f} GiB but this machine has "
                        f"{available / 2**30:.2f} GiB of memory available; give a smaller --host-cache-gb")
    if host_cache_memory < block_bytes:
        raise KilnError(f"the host KV tier of {host_cache_memory} bytes holds no block of {block_bytes} bytes; "
                        "give a larger --host-cache-gb")
    return HostBlocks(tensors, host_cache_memory // block_bytes)


def run_transfers(host: HostBlocks | None, transfers: tuple[BlockCopy, ...]) -> None:
    """An executor's share of a step's `kv_transfers`."""
    if transfers:
        if host is None:
            raise RuntimeError("the KV manager queued host-tier copies, but the executor has no host tier")
        host.run(transfers)


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file: unchecked)."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")), None)
    except OSError:
        return None


class HostBlocks:
    """The host tier's memory: for each distinct slot tensor of the device pool ([blocks, *page];
    the states of different cache groups share them), a host tensor [num_blocks, *page]."""

    def __init__(self, device_tensors: list[torch.Tensor], num_blocks: int):
        self.device_tensors = device_tensors
        self.num_blocks = num_blocks
        self.on_gpu = any(t.device.type == "cuda" for t in self.device_tensors)
        self.host_tensors = [self._host((num_blocks, *t.shape[1:]), t.dtype) for t in self.device_tensors]
        block_bytes = sum(t[0].nbytes for t in self.device_tensors)
        log.info("host KV tier: %d blocks (%.0f MiB)%s", num_blocks, num_blocks * block_bytes / 2**20,
                 ", pinned" if self.on_gpu else "")

    def _host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.on_gpu:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        return zeros(shape, dtype, torch.device("cpu"))

    def run(self, copies: Iterable[BlockCopy]) -> None:
        """The copies, in order (each run of one direction batched)."""
        for to_host, run in itertools.groupby(copies, key=lambda c: c.to_host):
            last = {(c.host_block if to_host else c.device_block): c for c in run}  # the last write to each block wins
            device = self.device_tensors[0].device
            device_idx = torch.tensor([c.device_block for c in last.values()], device=device)
            host_idx = torch.tensor([c.host_block for c in last.values()])
            (self._offload if to_host else self._load)(device_idx, host_idx)

    def _offload(self, device_idx: torch.Tensor, host_idx: torch.Tensor) -> None:
        staged = [t.index_select(0, device_idx).to("cpu", non_blocking=True) for t in self.device_tensors]
        if self.on_gpu:
            torch.cuda.current_stream(self.device_tensors[0].device).synchronize()
        for host, blocks in zip(self.host_tensors, staged):
            host.index_copy_(0, host_idx, blocks)

    def _load(self, device_idx: torch.Tensor, host_idx: torch.Tensor) -> None:
        for tensor, host in zip(self.device_tensors, self.host_tensors):
            tensor.index_copy_(0, device_idx, host.index_select(0, host_idx).to(tensor.device, non_blocking=True))
