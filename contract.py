"""What the compiler and the serving runtime agree on, importable without the compiler (no sympy,
no triton): dtype names, the phases, the step inputs' names, block-sparse layouts and cache groups.

The artifact carries these as data (runtime/artifact.py); `kiln.ir` builds its types on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i32": torch.int32,
    "i64": torch.int64,
    "bool": torch.bool,
}

PHASES = ("mixed", "decode")  # mixed: some sequence brings a prefill chunk; decode: one new token each

# The step function's inputs (ir/step.py types them): every compiled program reads these
STEP_INPUT_NAMES = ("input_ids", "positions", "query_start", "seq_lens", "block_tables", "slot_mapping",
                    "logits_indices", "state_indices")


@dataclass(frozen=True)
class BlockSparseLayout:
    """Strided block sparsity (Sparse Transformer / Phi-3-small style) over blocks of `block_size`
    tokens. Query block i sees key block j <= i when j is one of its `local_blocks` latest blocks
    (i - local_blocks < j, its own block included) or a "vertical" block ((j + 1) % vertical_stride
    == 0); within the blocks it sees, attention is causal. Every head uses the same layout."""

    block_size: int
    local_blocks: int
    vertical_stride: int

    def __post_init__(self):
        if self.block_size < 1 or self.local_blocks < 1 or self.vertical_stride < 1:
            raise ValueError(f"a block-sparse layout needs block_size, local_blocks and vertical_stride >= 1, got {self}")

    def sees(self, query_block, key_block):
        """Whether query block `query_block` attends to key block `key_block` (ints or int tensors,
        broadcast; key blocks past the query block are excluded too)."""
        local = (query_block - key_block < self.local_blocks) & (key_block <= query_block)
        return local | ((key_block + 1) % self.vertical_stride == 0) & (key_block <= query_block)

    def first_local_block(self, query_block: int) -> int:
        """The first of the local key blocks of `query_block` (the ones after it are all seen)."""
        return max(0, query_block - self.local_blocks + 1)

    def density(self, num_blocks: int) -> float:
        """The fraction of the causal (query block, key block) pairs seen, over `num_blocks` blocks."""
        seen = sum(self.sees(i, j) for i in range(num_blocks) for j in range(i + 1))
        return seen / (num_blocks * (num_blocks + 1) / 2)



FULL, SLIDING_WINDOW, BLOCK_SPARSE = "full", "sliding_window", "block_sparse"


@dataclass(frozen=True)
class CacheGroup:
    """Layers sharing one block table. `states`: their KV-cache state names (k, v per layer, in
    layer order); `pages`: each state's block shape [block_size, num_kv_heads, head_dim], all
    of dtype `dtype`."""

    kind: str
    layers: tuple[int, ...]
    states: tuple[str, ...]
    block_size: int
    pages: tuple[tuple[int, ...], ...]
    dtype: str
    window: int | None = None
    layout: BlockSparseLayout | None = None

    def page_bytes(self, state: int) -> int:
        """Bytes of one block of state `state`."""
        return math.prod(self.pages[state]) * DTYPES[self.dtype].itemsize

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token takes in all of the group's layers."""
        return sum(self.page_bytes(i) for i in range(len(self.states))) // self.block_size

    def to_json(self) -> dict:
        layout = self.layout
        return {"kind": self.kind, "layers": list(self.layers), "states": list(self.states),
                "block_size": self.block_size, "pages": [list(p) for p in self.pages], "dtype": self.dtype,
                "bytes_per_token": self.bytes_per_token, "window": self.window,
                "layout": None if layout is None else [layout.block_size, layout.local_blocks, layout.vertical_stride]}

    @classmethod
    def from_json(cls, data: dict) -> CacheGroup:
        """The group of a manifest entry (which also records `bytes_per_token` and the compiler's
        `blocks_per_sequence`, a decode's need at the model's full context: derived, not read)."""
        layout = data.get("layout")
        return cls(data["kind"], tuple(data["layers"]), tuple(data["states"]), data["block_size"],
                   tuple(tuple(p) for p in data["pages"]), data["dtype"], data.get("window"),
                   None if layout is None else BlockSparseLayout(*layout))


RECURRENT_STATE = "recurrent_state"


@dataclass(frozen=True)
class StateGroup:
    """The recurrent layers' per-sequence states in the state pool: one slot per sequence holds,
    for each of `states` (each linear layer's conv window and recurrent state, in layer order), a
    tensor of `shapes[i]` in `dtypes[i]`. The pool tensor of state i is [num_slots, *shapes[i]],
    indexed by the step's `state_indices`."""

    layers: tuple[int, ...]
    states: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    kind: str = RECURRENT_STATE

    @property
    def slot_bytes(self) -> int:
        """Bytes one sequence's slot takes over all the group's states."""
        return sum(math.prod(shape) * DTYPES[dtype].itemsize for shape, dtype in zip(self.shapes, self.dtypes))

    def to_json(self) -> dict:
        return {"kind": self.kind, "layers": list(self.layers), "states": list(self.states),
                "shapes": [list(s) for s in self.shapes], "dtypes": list(self.dtypes), "slot_bytes": self.slot_bytes}

    @classmethod
    def from_json(cls, data: dict) -> StateGroup:
        return cls(tuple(data["layers"]), tuple(data["states"]), tuple(tuple(s) for s in data["shapes"]),
                   tuple(data["dtypes"]), data["kind"])


def group_input_names(index: int) -> tuple[str, str]:
    """The step inputs (block table, slot mapping) of cache group `index`."""
    return ("block_tables", "slot_mapping") if index == 0 else (f"block_tables_g{index}", f"slot_mapping_g{index}")


def arch_name(arch: int | str | None) -> str:
    """The architecture a GPU binary names: "sm_90a" for CUDA capability 90 (what cuobjdump shows),
    an AMDGPU processor as is ("gfx942"); "cpu" for no GPU."""
    if arch is None:
        return "cpu"
    if isinstance(arch, str):
        return arch
    return f"sm_{arch}{'a' if arch >= 90 else ''}"
