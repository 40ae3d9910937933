"""The state pool: per-sequence state of the recurrent (linear-attention) layers, beside the paged
KV cache (DESIGN.md, "cache groups").

A sequence holds one slot from admission until it finishes, is aborted or preempted; a step's
`state_indices[b]` names sequence b's slot, and each recurrent op reads its state there (zeros
when its chunk starts the sequence: ir/linear_rules.py) and writes it back. Slots are never
cleared. The pool tensors have one row more than there are slots: `padding_slot`, where padded
rows of a CUDA-graph bucket write, so that padding never touches a sequence's state.
"""

from __future__ import annotations

import logging

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
