"""One engine step's inputs in the project's step calling convention, and the Executor protocol.

Every tensor is int32 on the CPU (the executor moves them to its device):
  input_ids[T], positions[T]  the flattened new tokens of all sequences;
  query_start[B+1]            offsets of each sequence's tokens (query_start[B] = T);
  seq_lens[B]                 context length after this step (cached + new tokens);
  block_tables[B, M]          physical KV block ids of logical blocks 0..ceil(seq_len/bs)-1,
                              padded with 0 past that (never read);
  slot_mapping[T]             block_id * block_size + offset: where each new token's k, v go;
  logits_indices[B]           the row whose logits are returned, query_start[1:] - 1;
  state_indices[B]            each sequence's slot in the recurrent-state pool (runtime/state_pool.py);
the executor first runs `kv_transfers` (blocks copied between the KV pool and its host tier) and
`state_copies` (prefix-cache snapshots saved and restored).
The first `num_decodes` sequences have exactly one new token. block_tables and slot_mapping are
cache group 0's; a model with more cache groups (ir/cache_groups.py) also takes group g's as
block_tables_g<g>, slot_mapping_g<g> (`group_tables`).
"""

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from kiln.contract import STEP_INPUT_NAMES, group_input_names
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.kv_tiers import BlockCopy
from kiln.runtime.scheduler import SchedulerOutput


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    query_start: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    logits_indices: torch.Tensor
    num_decodes: int
    group_tables: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # (block_tables, slot_mapping), groups 1..
    state_indices: torch.Tensor | None = None  # None: slot 0 each (a model without recurrent layers)
    state_copies: tuple[tuple[int, int], ...] = ()  # (source, destination) state slots to copy first, in order
    kv_transfers: tuple[BlockCopy, ...] = ()  # KV blocks to copy to or from the host tier first, in order

    def inputs(self) -> dict[str, torch.Tensor]:
        """The step program's inputs by name, every cache group's included."""
        named = {name: getattr(self, name) for name in STEP_INPUT_NAMES}
        if self.state_indices is None:
            named["state_indices"] = torch.zeros(self.num_seqs, dtype=torch.int32)
        for g, (table, slots) in enumerate(self.group_tables, start=1):
            table_name, slots_name = group_input_names(g)
            named[table_name], named[slots_name] = table, slots
        return named

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.num_decodes == self.num_seqs


class Executor(Protocol):
    """Runs the model on one StepBatch. It owns the KV cache tensors, sized from its memory
    budget to `num_blocks` blocks of `block_size` tokens."""

    block_size: int
    num_blocks: int
    vocab_size: int
    max_model_len: int
    cache_groups: list  # ir.cache_groups.CacheGroup: what the KV manager keeps per group
    num_state_slots: int  # slots of the recurrent-state pool (0 without recurrent layers)
    num_host_blocks: int  # blocks of the KV cache's host tier (0: none)


    def execute(self, batch: StepBatch) -> torch.Tensor:
        """fp32 logits [B, vocab_size], row b for the batch's sequence b, on any device. The
        engine owns the returned tensor (the sampler may modify it in place)."""
        ...


def build_step_batch(output: SchedulerOutput, kv: KVCacheManager) -> StepBatch:
    """The StepBatch of a scheduler output (before `update_from_output` advances it)."""
    bs = kv.block_size
    num_seqs = len(output.chunks)
    q_lens = np.fromiter((c.num_new_tokens for c in output.chunks), dtype=np.int32, count=num_seqs)
    query_start = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(q_lens, out=query_start[1:])
    seq_lens = np.fromiter((c.start + c.num_new_tokens for c in output.chunks), dtype=np.int32, count=num_seqs)
    tables = kv.block_tables([c.seq.seq_id for c in output.chunks]) or [np.zeros((num_seqs, 0), dtype=np.int32)]
    input_ids = np.fromiter(
        (t for c in output.chunks for t in c.seq.token_ids[c.start:c.start + c.num_new_tokens]),
        dtype=np.int32, count=int(query_start[-1]))
    seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
    positions = (seq_lens - q_lens)[seq_of_token] + (np.arange(len(input_ids)) - query_start[:-1][seq_of_token])
    logical_block, offset = positions // bs, positions % bs
    slots = [torch.from_numpy((table[seq_of_token, logical_block] * bs + offset).astype(np.int32)) if table.size
             else torch.full((len(positions),), -1, dtype=torch.int32) for table in tables]
    tables = [torch.from_numpy(table) for table in tables]
    return StepBatch(
        input_ids=torch.from_numpy(input_ids),
        positions=torch.from_numpy(positions.astype(np.int32)),
        query_start=torch.from_numpy(query_start),
        seq_lens=torch.from_numpy(seq_lens),
        block_tables=tables[0],
        slot_mapping=slots[0],
        logits_indices=torch.from_numpy(query_start[1:] - 1),
        state_indices=torch.from_numpy(kv.state_indices([c.seq.seq_id for c in output.chunks])),
        state_copies=tuple(kv.take_state_copies()),
        kv_transfers=tuple(kv.take_transfers()),
        num_decodes=output.num_decodes,
        group_tables=tuple(zip(tables[1:], slots[1:])),
    )
