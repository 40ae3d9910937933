"""build_step_batch against a naive, loop-by-loop reading of the step calling convention."""

import torch

from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.request import Sequence
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import ScheduledChunk, SchedulerOutput
from kiln.runtime.step_batch import build_step_batch


def naive_batch(chunks, kv):
    input_ids, positions, slots, query_start, seq_lens, tables = [], [], [], [0], [], []
    for c in chunks:
        blocks = kv.block_ids(c.seq.seq_id)
        for p in range(c.start, c.start + c.num_new_tokens):
            input_ids.append(c.seq.token_ids[p])
            positions.append(p)
            slots.append(blocks[p // kv.block_size] * kv.block_size + p % kv.block_size)
        query_start.append(query_start[-1] + c.num_new_tokens)
        seq_lens.append(c.start + c.num_new_tokens)
        tables.append(blocks[: -(-seq_lens[-1] // kv.block_size)])
    width = max(len(t) for t in tables)
    return dict(input_ids=input_ids, positions=positions, slot_mapping=slots, query_start=query_start,
                seq_lens=seq_lens, logits_indices=[q - 1 for q in query_start[1:]],
                block_tables=[t + [0] * (width - len(t)) for t in tables])


def test_mixed_step_matches_the_convention():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    kv.allocate("pad", 8)  # so the sequences' blocks are not 0, 1, 2, ...
    params = SamplingParams()
    specs = [(list(range(100, 111)), 10, 1), (list(range(200, 203)), 0, 3), (list(range(300, 320)), 8, 9)]
    chunks = []
    for i, (tokens, start, n) in enumerate(specs):
        seq = Sequence((f"s{i}", 0), tokens, params, 16, 0.0)
        kv.allocate(seq.seq_id, start + n)
        if i == 0:
            kv.free("pad")
        chunks.append(ScheduledChunk(seq, start, n))
    batch = build_step_batch(SchedulerOutput(chunks, num_decodes=1), kv)
    for name, expected in naive_batch(chunks, kv).items():
        tensor = getattr(batch, name)
        assert tensor.dtype == torch.int32, name
        assert tensor.tolist() == expected, name
    assert batch.num_seqs == 3 and batch.num_tokens == 13 and batch.num_decodes == 1 and not batch.is_decode_only
