"""Paged KV block pool with ref counts and prefix caching by chained block hashes.

The pool holds `num_blocks` blocks of `block_size` token slots (the executor owns the tensors
`[num_blocks, block_size, num_kv_heads, head_dim]`; here a block is just an id). A sequence owns
a list of block ids, logical block i holding its tokens [i * block_size, (i + 1) * block_size).

Prefix caching: once a block is FULL and its KV computed, it gets a hash chained on its parent,
sha256(parent hash + its token ids), so equal hashes mean equal whole prefixes. A later sequence
whose leading full blocks hash the same shares those blocks (ref count + 1) instead of
recomputing them. A freed cached block stays reusable in an LRU free queue until a new
allocation evicts it; a freed uncached block is handed out first.

The scheduler sees `KVCacheManager` only: `find_prefix` / `can_allocate` / `allocate` / `free`
/ `cache_computed`, all keyed by sequence id.
"""

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

BlockHash = bytes
EMPTY_TABLE = array("i")


def chain_hash(parent: BlockHash | None, token_ids: list[int]) -> BlockHash:
    """The hash of a full block given its parent block's hash (None for the first block)."""
    return hashlib.sha256((parent or b"") + array("q", token_ids).tobytes()).digest()


class BlockPool:
    """Block ids, their ref counts, the hash -> block map, and the LRU free queue.

    Invariants: a block is in the free queue iff its ref count is 0; a block with a hash is
    the one block the hash map points to for that hash.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        self._free = OrderedDict.fromkeys(range(num_blocks))  # front = evicted / reused first

    @property
    def num_free(self) -> int:
        """Blocks with ref count 0, cached ones included (they are reclaimable)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a prefix-cache entry, in use or free."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash)

    def take(self, n: int) -> list[int]:
        """n free blocks (ref count becomes 1), evicting their cache entries."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free; check can_allocate first")
        taken = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block_hash = self._block_hash[block_id]
            if block_hash is not None:
                del self._cached[block_hash]
                self._block_hash[block_id] = None
            self._ref_counts[block_id] = 1
            taken.append(block_id)
        return taken

    def touch(self, block_ids: list[int]) -> None:
        """Add a reference to cached blocks (a prefix hit), taking free ones off the free queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop a reference; a block reaching 0 becomes free (cached: most recently used end)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise RuntimeError(f"KV block {block_id} released more often than taken")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None
                if self._block_hash[block_id] is None:
                    self._free.move_to_end(block_id, last=False)

    def set_hash(self, block_id: int, block_hash: BlockHash) -> None:
        """Make a computed full block findable, unless another block already holds that prefix."""
        if block_hash not in self._cached and self._block_hash[block_id] is None:
            self._cached[block_hash] = block_id
            self._block_hash[block_id] = block_hash


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks holding a sequence's leading full blocks; `num_tokens` of KV to skip."""

    block_ids: tuple[int, ...]
    hashes: tuple[BlockHash, ...]
    num_tokens: int


NO_PREFIX = PrefixHit((), (), 0)


@dataclass(frozen=True)
class KVCacheBlocks:
    """Block ids of one sequence, in logical block order."""

    block_ids: tuple[int, ...]


NO_BLOCKS = KVCacheBlocks(())


class KVCacheManager:
    """Per-sequence block lists over a `BlockPool`; what the scheduler calls."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[object, array] = {}  # int32 arrays: a step's block table is one join
        self._hashes: dict[object, list[BlockHash]] = {}  # chain hashes of the computed full blocks
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    @property
    def num_cached_blocks(self) -> int:
        return self.pool.num_cached

    def block_ids(self, seq_id) -> list[int]:
        return list(self._blocks.get(seq_id, ()))

    def block_table(self, seq_ids: list) -> np.ndarray:
        """[len(seq_ids), most blocks] int32: each sequence's block ids, padded with 0."""
        blocks = [self._blocks.get(seq_id, EMPTY_TABLE) for seq_id in seq_ids]
        lengths = np.fromiter(map(len, blocks), dtype=np.int64, count=len(blocks))
        table = np.zeros((len(blocks), int(lengths.max(initial=0))), dtype=np.int32)
        table[np.arange(table.shape[1]) < lengths[:, None]] = np.frombuffer(b"".join(blocks), dtype=np.int32)
        return table

    def find_prefix(self, token_ids: list[int]) -> PrefixHit:
        """The longest run of cached leading full blocks, leaving at least the last token to compute
        (its logits are needed). Pure: nothing is referenced until `allocate`."""
        if not self.enable_prefix_caching:
            return NO_PREFIX
        block_ids, hashes, parent = [], [], None
        for start in range(0, len(token_ids) - self.block_size, self.block_size):
            parent = chain_hash(parent, token_ids[start:start + self.block_size])
            block_id = self.pool.lookup(parent)
            if block_id is None:
                break
            block_ids.append(block_id)
            hashes.append(parent)
        return PrefixHit(tuple(block_ids), tuple(hashes), len(block_ids) * self.block_size)

    def _num_new_blocks(self, seq_id, num_tokens: int, prefix: PrefixHit) -> int:
        num_needed = -(-num_tokens // self.block_size)
        return max(0, num_needed - len(self._blocks.get(seq_id, ())) - len(prefix.block_ids))

    def can_allocate(self, seq_id, num_tokens: int, prefix: PrefixHit = NO_PREFIX) -> bool:
        """Whether the sequence's first `num_tokens` tokens can all have slots (prefix hit blocks
        that are currently free count against the free blocks too)."""
        num_new = self._num_new_blocks(seq_id, num_tokens, prefix)
        if prefix.block_ids:
            num_new += sum(self.pool.ref_count(b) == 0 for b in prefix.block_ids)
        return num_new <= self.pool.num_free

    def allocate(self, seq_id, num_tokens: int, prefix: PrefixHit = NO_PREFIX) -> KVCacheBlocks:
        """Give the sequence slots for its first `num_tokens` tokens; `prefix` only on its first
        allocation. Precondition: `can_allocate(...)` with the same arguments. Returns the blocks
        added to the sequence (prefix hits, then new ones)."""
        num_new = self._num_new_blocks(seq_id, num_tokens, prefix)
        if not num_new and seq_id in self._blocks and not prefix.block_ids:
            return NO_BLOCKS  # a decode inside its last block: the common case
        if prefix.block_ids and seq_id in self._blocks:
            raise RuntimeError(f"prefix hit for {seq_id}, which already holds blocks")
        self.pool.touch(list(prefix.block_ids))
        added = prefix.block_ids + tuple(self.pool.take(num_new))
        self._blocks.setdefault(seq_id, array("i")).extend(added)
        self._hashes.setdefault(seq_id, list(prefix.hashes))
        return KVCacheBlocks(added)

    def record_prefix_query(self, num_prompt_tokens: int, prefix: PrefixHit) -> None:
        """Count one admission's prompt tokens and how many of them the cache served."""
        self.prefix_query_tokens += num_prompt_tokens
        self.prefix_hit_tokens += prefix.num_tokens

    def cache_computed(self, seq_id, token_ids: list[int], num_computed_tokens: int) -> None:
        """Register the sequence's full blocks whose KV is now computed."""
        if not self.enable_prefix_caching:
            return
        hashes, blocks = self._hashes[seq_id], self._blocks[seq_id]
        bs = self.block_size
        for i in range(len(hashes), num_computed_tokens // bs):
            hashes.append(chain_hash(hashes[-1] if hashes else None, token_ids[i * bs:(i + 1) * bs]))
            self.pool.set_hash(blocks[i], hashes[-1])

    def free(self, seq_id) -> None:
        """Return all of the sequence's blocks (tail first, so its head stays cached longest)."""
        blocks = self._blocks.pop(seq_id, EMPTY_TABLE)
        self._hashes.pop(seq_id, None)
        self.pool.release(blocks[::-1])
