"""The state pool: per-sequence state of the recurrent (linear-attention) layers, beside the paged
KV cache (DESIGN.md, "cache groups").

A sequence holds one slot from admission until it finishes, is aborted or preempted; a step's
`state_indices[b]` names sequence b's slot, and each recurrent op reads its state there (zeros
when its chunk starts the sequence: ir/linear_rules.py) and writes it back. Slots are never
cleared. The pool tensors have one row more than there are slots: `padding_slot`, where padded
rows of a CUDA-graph bucket write, so that padding never touches a sequence's state.

Prefix caching keeps snapshots (`StateSnapshots`): with it on, the other half of the slots holds
states saved when a sequence's computed tokens reach a multiple of the snapshot interval, keyed
by the chain hash of the block that ends there. A later sequence with that prefix starts from a
copy of the snapshot instead of recomputing it. The KV manager does the bookkeeping; the copies
(`state_copies`, (source slot, destination slot) pairs) run on the executor before the step that
follows, in the order they were made.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from kiln.contract import DTYPES, StateGroup
from kiln.runtime.kv_groups import zeros

log = logging.getLogger("kiln.state_pool")

MAX_STATE_SLOTS = 256  # the engine's default max_num_seqs: more slots than that would go unused
POOL_SHARE = 4  # the pool takes at most 1/POOL_SHARE of the cache budget; the KV blocks the rest


class StateSlots:
    """Which sequence holds which of `num_slots` slots (the KV manager's per-sequence bookkeeping)."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: slot 0 first
        self._held: dict[object, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def holds(self, seq_id) -> bool:
        return seq_id in self._held

    def take(self, seq_id) -> int:
        """A free slot for `seq_id`. Precondition: num_free > 0 and the sequence holds none."""
        if seq_id in self._held:
            raise RuntimeError(f"sequence {seq_id} already holds state slot {self._held[seq_id]}")
        self._held[seq_id] = slot = self._free.pop()
        return slot

    def slot(self, seq_id) -> int:
        return self._held[seq_id]

    def free(self, seq_id) -> None:
        """Returns the sequence's slot, if it holds one."""
        slot = self._held.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)


class StateSnapshots:
    """Snapshot slots [first, first + count), keyed by block hash, least recently used evicted
    first; `interval` tokens (a multiple of the block size) between snapshot points."""

    def __init__(self, first: int, count: int, interval: int):
        self.interval = interval
        self._free = list(range(first + count - 1, first - 1, -1))
        self._by_hash: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, block_hash: bytes) -> int | None:
        """The snapshot slot saved at the block with `block_hash` (marked recently used), if any."""
        slot = self._by_hash.get(block_hash)
        if slot is not None:
            self._by_hash.move_to_end(block_hash)
        return slot

    def save(self, block_hash: bytes) -> int | None:
        """A slot to save the state at `block_hash` into (evicting the least recently used
        snapshot when none is free); None when that state is already saved."""
        if block_hash in self._by_hash:
            return None
        if not self._free:
            self._free.append(self._by_hash.popitem(last=False)[1])
        self._by_hash[block_hash] = slot = self._free.pop()
        return slot

    def drop(self, block_hash: bytes) -> None:
        """Forgets the snapshot at `block_hash` (its block left the prefix cache)."""
        slot = self._by_hash.pop(block_hash, None)
        if slot is not None:
            self._free.append(slot)

    def chunk_end(self, start: int, end: int) -> int:
        """Where a chunk of tokens [start, end) must stop so that the state at each snapshot point
        is a chunk's final state: at the first snapshot point after `start`, if it is before `end`."""
        return min(end, (start // self.interval + 1) * self.interval)


def copy_slots(pool: dict[str, torch.Tensor], copies: list[tuple[int, int]]) -> None:
    """Runs the state copies (source slot, destination slot), in order, on every pool tensor."""
    for source, destination in copies:
        for tensor in pool.values():
            tensor[destination].copy_(tensor[source])


def fit_state_slots(groups: list[StateGroup], budget: int, max_slots: int = MAX_STATE_SLOTS) -> int:
    """Slots for up to `max_slots` sequences within 1/POOL_SHARE of `budget` bytes (at least one);
    0 for a model without recurrent layers."""
    if not groups:
        return 0
    slot_bytes = sum(g.slot_bytes for g in groups)
    slots = max(1, min(max_slots, MAX_STATE_SLOTS, budget // POOL_SHARE // slot_bytes - 1))
    log.info("state pool: %d slots of %.2f MiB (%d recurrent layers), one per running sequence", slots,
             slot_bytes / 2**20, sum(len(g.layers) for g in groups))
    return slots


def pool_bytes(groups: list[StateGroup], num_slots: int) -> int:
    """Bytes of the pool tensors for `num_slots` slots (and the padding slot)."""
    return (num_slots + 1) * sum(g.slot_bytes for g in groups) if num_slots else 0


def allocate_state_pool(groups: list[StateGroup], num_slots: int, device) -> dict[str, torch.Tensor]:
    """Zeroed pool tensors, state name -> [num_slots + 1, *shape] (the last row: the padding slot)."""
    return {name: zeros((num_slots + 1, *shape), DTYPES[dtype], torch.device(device))
            for group in groups for name, shape, dtype in zip(group.states, group.shapes, group.dtypes)}
