"""The step function's calling convention, shared by every attention variant and by mixed
prefill+decode batches (see DESIGN.md). All step inputs are int32."""

import torch

from kiln.contract import STEP_INPUT_NAMES, group_input_names
from kiln.ir.types import NB, NS, B, M, T, TensorType

STEP_INPUTS: dict[str, TensorType] = {
    "input_ids": TensorType((T,), "i32"),  # flattened new tokens of all sequences
    "positions": TensorType((T,), "i32"),  # position of each token in its sequence
    "query_start": TensorType((B + 1,), "i32"),  # offsets of each sequence's tokens; [0] = 0, [B] = T
    "seq_lens": TensorType((B,), "i32"),  # context length after this step (cached + new tokens)
    "block_tables": TensorType((B, M), "i32"),  # physical KV block of each logical block
    "slot_mapping": TensorType((T,), "i32"),  # KV slot each new token writes (-1: none)
    "logits_indices": TensorType((B,), "i32"),  # token row whose logits are returned, per sequence
    "state_indices": TensorType((B,), "i32"),  # each sequence's slot in the recurrent-state pool
}

assert tuple(STEP_INPUTS) == STEP_INPUT_NAMES


class PagedSequences:
    """A naive paged-KV bookkeeper for running step graphs by hand (tests, `kiln inspect`,
    debugging); the serving runtime has its own. Blocks come from a shuffled pool, so block
    tables are non-contiguous, as they are in serving. A graph with `num_groups` cache groups
    (ir/cache_groups.py) gets the same tables for every group: `zero_states` gives each layer
    its own cache, so the groups need not own disjoint blocks, and nothing is released. Each
    sequence gets the next recurrent-state slot when it first appears."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0, num_groups: int = 1):
        self.block_size = block_size
        self.num_groups = num_groups
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.blocks: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}
        self.state_slots: dict[object, int] = {}

    def step(self, chunks: list[tuple[object, list[int]]]) -> dict:
        """Step inputs for `chunks` = [(sequence id, new token ids), ...] in batch order."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start, seq_lens = [0], []
        for seq, tokens in chunks:
            start = self.lengths.get(seq, 0)
            end = start + len(tokens)
            table = self.blocks.setdefault(seq, [])
            while len(table) * self.block_size < end:
                if not self.free:
                    raise RuntimeError("PagedSequences ran out of KV blocks")
                table.append(self.free.pop())
            ids += tokens
            positions += range(start, end)
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
            query_start.append(query_start[-1] + len(tokens))
            seq_lens.append(end)
            self.lengths[seq] = end
        width = max(len(self.blocks[seq]) for seq, _ in chunks)
        tables = [self.blocks[seq] + [0] * (width - len(self.blocks[seq])) for seq, _ in chunks]
        i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
        inputs = {
            "input_ids": i32(ids), "positions": i32(positions), "query_start": i32(query_start),
            "seq_lens": i32(seq_lens), "block_tables": i32(tables), "slot_mapping": i32(slots),
            "logits_indices": i32(query_start[1:]) - 1,
            "state_indices": i32([self.state_slots.setdefault(seq, len(self.state_slots)) for seq, _ in chunks]),
        }
        for g in range(1, self.num_groups):
            table_name, slots_name = group_input_names(g)
            inputs[table_name], inputs[slots_name] = inputs["block_tables"], inputs["slot_mapping"]
        return inputs


def zero_states(graph, num_blocks: int, num_slots: int = 8) -> dict:
    """Zeroed buffers for every `state` of `graph`: KV caches with NB = num_blocks, recurrent
    states with NS = num_slots."""
    sizes = {NB: num_blocks, NS: num_slots}
    return {n.name: torch.zeros(n.type.concrete_shape(sizes), dtype=n.type.torch_dtype) for n in graph.states}
