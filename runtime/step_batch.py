"""One engine step's inputs in the project's step calling convention, and the Executor protocol.

Every tensor is int32 on the CPU (the executor moves them to its device):
  input_ids[T], positions[T]  the flattened new tokens of all sequences;
  query_start[B+1]            offsets of each sequence's tokens (query_start[B] = T);
  seq_lens[B]                 context length after this step (cached + new tokens);
  block_tables[B, M]          physical KV block ids of logical blocks 0..ceil(seq_len/bs)-1,
                              padded with 0 past that (never read);
  slot_mapping[T]             block_id * block_size + offset: where each new token's k, v go;
  logits_indices[B]           the row whose logits are returned, query_start[1:] - 1.
The first `num_decodes` sequences have exactly one new token.
"""

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from kiln.runtime.kv_cache import KVCacheManager
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
    block_tables = kv.block_table([c.seq.seq_id for c in output.chunks])
    input_ids = np.fromiter(
        (t for c in output.chunks for t in c.seq.token_ids[c.start:c.start + c.num_new_tokens]),
        dtype=np.int32, count=int(query_start[-1]))
    seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
    positions = (seq_lens - q_lens)[seq_of_token] + (np.arange(len(input_ids)) - query_start[:-1][seq_of_token])
    slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs
    return StepBatch(
        input_ids=torch.from_numpy(input_ids),
        positions=torch.from_numpy(positions.astype(np.int32)),
        query_start=torch.from_numpy(query_start),
        seq_lens=torch.from_numpy(seq_lens),
        block_tables=torch.from_numpy(block_tables),
        slot_mapping=torch.from_numpy(slot_mapping.astype(np.int32)),
        logits_indices=torch.from_numpy(query_start[1:] - 1),
        num_decodes=output.num_decodes,
    )
