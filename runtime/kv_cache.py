"""Paged KV block pool with ref counts, per-cache-group block tables, and prefix caching by
chained block hashes.

The pool holds `num_blocks` blocks of `block_size` token slots (the executor owns the tensors;
here a block is just an id). All cache groups (ir/cache_groups.py) draw from the one pool. A
sequence has one block table per group, logical block i holding its tokens
[i * block_size, (i + 1) * block_size). A sliding-window or block-sparse group releases the
blocks no later query of the sequence can read (`release_unreachable`, runtime/kv_groups.py);
their table entries become RELEASED (-1; 0 in the step's block tables: never read).

Prefix caching: once a block is FULL and its KV computed, it gets a hash chained on its parent,
sha256(parent hash + its token ids), so equal hashes mean equal whole prefixes. A later sequence
whose leading full blocks hash the same shares those blocks (ref count + 1) instead of
recomputing them: in a full group it needs every block before the hit point, in a bounded group
only the ones its first new query reads (vLLM's hybrid KV cache manager does the same). A block
is cached under (group, hash). A freed cached block stays reusable in an LRU free queue until a
new allocation evicts it; a freed uncached block is handed out first.

A model with recurrent layers also keeps a slot of the state pool per sequence
(runtime/state_pool.py): taken with its first blocks (admission waits while none is free),
returned with them. A prefix hit then also needs the recurrent state at the hit point: with
prefix caching on and a `snapshot_interval` (else prefix caching is off for such a model), half
of the slots hold snapshots of the state every `snapshot_interval` tokens, each evicted with the
group-0 block that ends at its point (or, out of slots, the least recently used); a hit is the
longest cached prefix that ends at a snapshot, and starts from a copy of it. Prefill chunks are
cut at snapshot points (`chunk_tokens`), so the state there is a step's final state. The copies
are queued for the executor (`take_state_copies`).

With a host tier (`host_blocks`, runtime/kv_tiers.py), a cached block that the pool evicts is
copied to host memory first, and a hit may continue into blocks the host tier holds: each is
copied back into a fresh block instead of recomputed. The copies are queued for the executor
(`take_transfers`), to run before the step, ahead of anything the step writes.

The scheduler sees `KVCacheManager` only: `find_prefix` / `can_allocate` / `allocate` /
`release_unreachable` / `free` / `cache_computed`, all keyed by sequence id.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kiln.contract import FULL, CacheGroup
from kiln.errors import KilnError
from kiln.runtime.kv_groups import GroupPolicy, blocks_needed, capacity_tokens
from kiln.runtime.kv_tiers import BlockCopy, HostTier
from kiln.runtime.state_pool import StateSlots, StateSnapshots

BlockHash = bytes
CacheKey = tuple[int, BlockHash]  # (cache group, chained block hash)
RELEASED = -1  # a table entry whose block the sequence no longer holds
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
        self._block_hash: list[CacheKey | None] = [None] * num_blocks
        self._cached: dict[CacheKey, int] = {}
        self._free = OrderedDict.fromkeys(range(num_blocks))  # front = evicted / reused first
        self.on_evict: Callable[[CacheKey, int], None] | None = None  # told of each (entry, block) `take` evicts

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

    def lookup(self, block_hash: CacheKey) -> int | None:
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
                if self.on_evict is not None:
                    self.on_evict(block_hash, block_id)
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

    def set_hash(self, block_id: int, block_hash: CacheKey) -> None:
        """Make a computed full block findable, unless another block already holds that prefix."""
        if block_hash not in self._cached and self._block_hash[block_id] is None:
            self._cached[block_hash] = block_id
            self._block_hash[block_id] = block_hash

    def unset_hash(self, block_id: int) -> None:
        """Make a block unfindable (its contents are not what its hash says)."""
        block_hash = self._block_hash[block_id]
        if block_hash is not None:
            del self._cached[block_hash]
            self._block_hash[block_id] = None


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks holding a sequence's first `num_tokens` tokens of KV, to skip computing:
    per group, the block table up to the hit (RELEASED where a bounded group needs no block, or
    where the block is in the host tier: `loads` lists those as (group, logical block, host block))."""

    block_ids: tuple[tuple[int, ...], ...]
    hashes: tuple[BlockHash, ...]
    num_tokens: int
    snapshot: int | None = None  # the state slot holding the recurrent state at the hit point
    loads: tuple[tuple[int, int, int], ...] = ()

    @property
    def host_tokens(self) -> int:
        """Tokens of the hit whose blocks (in some group) come from the host tier."""
        if not self.loads:
            return 0
        return len({i for _, i, _ in self.loads}) * (self.num_tokens // len(self.hashes))


NO_PREFIX = PrefixHit((), (), 0)


@dataclass(frozen=True)
class KVCacheBlocks:
    """Block ids added to one sequence, per group, in logical block order."""

    block_ids: tuple[tuple[int, ...], ...]


NO_BLOCKS = KVCacheBlocks(())


class KVCacheManager:
    """Per-sequence, per-group block tables over one `BlockPool`, and each sequence's state slot
    when `state_slots` > 0; what the scheduler calls. Without `groups` (None), every layer is in one
    full group (the tables of one block size); with no groups ([], a model without attention) a
    sequence holds no blocks, only its state slot."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 groups: list[CacheGroup] | None = None, state_slots: int = 0, snapshot_interval: int | None = None,
                 host_blocks: int = 0, clock: Callable[[], float] = time.monotonic):
        if host_blocks and state_slots:
            raise KilnError("the host KV tier does not keep the recurrent-state snapshots a prefix hit of this model "
                            "needs; serve it without --host-cache-gb")
        self.block_size = block_size
        self.snapshots: StateSnapshots | None = None
        self.state_copies: list[tuple[int, int]] = []
        if state_slots and enable_prefix_caching and snapshot_interval and state_slots > 1:
            if snapshot_interval % block_size:
                raise KilnError(f"the state snapshot interval {snapshot_interval} is not a multiple of the block size "
                                f"{block_size}; give a multiple of {block_size} tokens")
            self.snapshots = StateSnapshots(state_slots - state_slots // 2, state_slots // 2, snapshot_interval)
            state_slots -= state_slots // 2
        self.states = StateSlots(state_slots) if state_slots else None
        self.enable_prefix_caching = enable_prefix_caching and (self.states is None or self.snapshots is not None)
        self.pool = BlockPool(num_blocks)
        self.host = HostTier(host_blocks, clock) if host_blocks and self.enable_prefix_caching else None
        self.transfers: list[BlockCopy] = []
        self.pool.on_evict = self._evicted
        self.policies = [GroupPolicy(g) for g in groups] if groups is not None \
            else [GroupPolicy(_one_full_group(block_size))]
        if any(p.block_size != block_size for p in self.policies):
            raise ValueError(f"every cache group must use the pool's block size {block_size}")
        self._bounded = any(p.bounded for p in self.policies)  # some group releases blocks out of reach
        # per sequence, one int32 array per group: a step's block table is one join per group
        self._blocks: dict[object, list[array]] = {}
        self._released_upto: dict[object, list[int]] = {}  # per group: blocks before it were offered to release
        self._hashes: dict[object, list[BlockHash]] = {}  # chain hashes of the computed full blocks
        self.prefix_hit_tokens = 0
        self.prefix_host_hit_tokens = 0  # of the hits, tokens copied back from the host tier
        self.prefix_query_tokens = 0

    @property
    def num_groups(self) -> int:
        return len(self.policies)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    @property
    def num_cached_blocks(self) -> int:
        return self.pool.num_cached

    def blocks_needed(self, num_tokens: int, chunk: int) -> int:
        """Blocks one sequence of `num_tokens` tokens holds at its peak, computed in chunks of `chunk`."""
        return blocks_needed(self.policies, num_tokens, chunk)

    def capacity_tokens(self, chunk: int = 1) -> int:
        """The longest sequence the whole pool can hold, computed in chunks of `chunk` tokens."""
        return capacity_tokens(self.policies, self.pool.num_blocks, chunk)

    def block_ids(self, seq_id, group: int = 0) -> list[int]:
        """The sequence's table in `group` (RELEASED entries included)."""
        tables = self._blocks.get(seq_id)
        return list(tables[group]) if tables else []

    def num_held_blocks(self, seq_id) -> int:
        """Blocks the sequence holds, all groups together."""
        return sum(len(t) - t.count(RELEASED) for t in self._blocks.get(seq_id, ()))

    def block_tables(self, seq_ids: list) -> list[np.ndarray]:
        """Per group, [len(seq_ids), most blocks] int32: each sequence's block ids, padded with 0
        (released entries are 0 too: kernels never read them)."""
        return [self._table(seq_ids, g) for g in range(self.num_groups)]

    def _table(self, seq_ids: list, group: int) -> np.ndarray:
        blocks = [self._blocks[s][group] if s in self._blocks else EMPTY_TABLE for s in seq_ids]
        lengths = np.fromiter(map(len, blocks), dtype=np.int64, count=len(blocks))
        table = np.zeros((len(blocks), int(lengths.max(initial=0))), dtype=np.int32)
        table[np.arange(table.shape[1]) < lengths[:, None]] = np.frombuffer(b"".join(blocks), dtype=np.int32)
        if self.policies[group].bounded:
            np.maximum(table, 0, out=table)
        return table

    def _evicted(self, key: CacheKey, block_id: int) -> None:
        """A block left the device cache: it goes to the host tier; a group-0 block's snapshot goes."""
        if key[0] == 0 and self.snapshots is not None:
            self.snapshots.drop(key[1])
        if self.host is not None:
            host_block = self.host.save(key)
            if host_block is not None:
                self.transfers.append(BlockCopy(True, block_id, host_block))

    def take_transfers(self) -> list[BlockCopy]:
        """The block copies between the device pool and the host tier queued since the last call,
        in order: the executor runs them before the next step."""
        transfers, self.transfers = self.transfers, []
        return transfers

    def forget_transfers(self, transfers: list[BlockCopy]) -> None:
        """The step that was to run `transfers` failed before they surely ran: forget what they
        would have filled (host entries of offloads, device blocks of loads)."""
        for copy in transfers:
            if copy.to_host and self.host is not None:
                self.host.drop(copy.host_block)
            elif not copy.to_host:
                self.pool.unset_hash(copy.device_block)

    def chunk_tokens(self, start: int, num_tokens: int) -> int:
        """How many of a sequence's `num_tokens` next tokens from `start` one step computes: all,
        or up to the next snapshot point (its state is then the step's final state)."""
        if self.snapshots is None:
            return num_tokens
        return self.snapshots.chunk_end(start, start + num_tokens) - start

    def take_state_copies(self) -> list[tuple[int, int]]:
        """The state copies (source slot, destination slot) queued since the last call, in order:
        the executor runs them before the next step."""
        copies, self.state_copies = self.state_copies, []
        return copies

    def state_indices(self, seq_ids: list) -> np.ndarray:
        """[len(seq_ids)] int32: each sequence's state slot (0 for a model without recurrent layers)."""
        if self.states is None:
            return np.zeros(len(seq_ids), dtype=np.int32)
        return np.fromiter(map(self.states.slot, seq_ids), dtype=np.int32, count=len(seq_ids))

    def find_prefix(self, token_ids: list[int]) -> PrefixHit:
        """The longest cached prefix of whole blocks, leaving at least the last token to compute
        (its logits are needed), that every group can serve: a full group needs all its blocks, a
        bounded group the ones the first new query reads. Pure: nothing is referenced until
        `allocate`."""
        if not self.enable_prefix_caching:
            return NO_PREFIX
        bs, hashes, parent = self.block_size, [], None
        for start in range(0, len(token_ids) - bs, bs):
            parent = chain_hash(parent, token_ids[start:start + bs])
            hashes.append(parent)
        full = [g for g, p in enumerate(self.policies) if not p.bounded]
        hit = next((i for i, h in enumerate(hashes) if not all(self._held((g, h)) for g in full)), len(hashes))
        bounded = [(g, p) for g, p in enumerate(self.policies) if p.bounded]
        for num_blocks in range(hit, 0, -1):  # full groups serve any of these; find one the bounded groups serve
            snapshot = self._snapshot_at(hashes, num_blocks)
            if self.states is not None and snapshot is None:
                continue
            if all(self._held((g, hashes[i])) for g, policy in bounded
                   for i in policy.read_blocks(num_blocks * bs, num_blocks)):
                tables, loads = self._hit_tables(hashes, num_blocks)
                return PrefixHit(tables, tuple(hashes[:num_blocks]), num_blocks * bs, snapshot, loads)
        return NO_PREFIX

    def _held(self, key: CacheKey) -> bool:
        """Whether the device pool or the host tier holds the block of `key`."""
        return self.pool.lookup(key) is not None or (self.host is not None and self.host.lookup(key) is not None)

    def _snapshot_at(self, hashes: list[BlockHash], num_blocks: int) -> int | None:
        """The snapshot slot of the state after the first `num_blocks` blocks, if one is kept."""
        if self.snapshots is None or num_blocks * self.block_size % self.snapshots.interval:
            return None
        return self.snapshots.lookup(hashes[num_blocks - 1])

    def _hit_tables(self, hashes: list[BlockHash], num_blocks: int):
        """Every group's table for a hit of `num_blocks` blocks (each block it reads is cached in
        a tier), and the (group, logical block, host block) of the ones to copy back."""
        tables, loads = [], []
        for g, policy in enumerate(self.policies):
            table = [RELEASED] * num_blocks
            for i in policy.read_blocks(num_blocks * self.block_size, num_blocks):
                block = self.pool.lookup((g, hashes[i]))
                if block is None:
                    assert self.host is not None  # find_prefix checked that a tier holds it
                    loads.append((g, i, self.host.lookup((g, hashes[i]))))
                else:
                    table[i] = block
            tables.append(tuple(table))
        return tuple(tables), tuple(loads)

    def _num_new_blocks(self, seq_id, num_tokens: int, prefix: PrefixHit) -> int:
        """New blocks for the sequence's first `num_tokens` tokens, all groups together."""
        tables = self._blocks.get(seq_id)
        have = len(tables[0]) if tables else len(prefix.block_ids[0]) if prefix.block_ids else 0
        return max(0, -(-num_tokens // self.block_size) - have) * len(self.policies)

    def holds_slots(self, seq_id, num_tokens: int) -> bool:
        """Whether the sequence already has slots for its first `num_tokens` tokens, so that
        `allocate` would add nothing (a decode inside its last block: the common case)."""
        tables = self._blocks.get(seq_id)
        return tables is not None and (not tables or num_tokens <= len(tables[0]) * self.block_size)

    def can_allocate(self, seq_id, num_tokens: int, prefix: PrefixHit = NO_PREFIX) -> bool:
        """Whether the sequence's first `num_tokens` tokens can all have slots (prefix hit blocks
        that are currently free count against the free blocks too)."""
        num_new = self._num_new_blocks(seq_id, num_tokens, prefix)
        if self.states is not None and seq_id not in self._blocks and not self.states.num_free:
            return False  # a new sequence needs a state slot too
        if prefix.block_ids:
            num_new += sum(self.pool.ref_count(b) == 0 for table in prefix.block_ids for b in table if b != RELEASED)
        return num_new + len(prefix.loads) <= self.pool.num_free

    def allocate(self, seq_id, num_tokens: int, prefix: PrefixHit = NO_PREFIX) -> KVCacheBlocks:
        """Give the sequence slots for its first `num_tokens` tokens; `prefix` only on its first
        allocation. Precondition: `can_allocate(...)` with the same arguments. Returns the blocks
        added to the sequence per group (prefix hits, then new ones)."""
        tables = self._blocks.get(seq_id)
        if tables is not None and prefix.block_ids:
            raise RuntimeError(f"prefix hit for {seq_id}, which already holds blocks")
        num_new = self._num_new_blocks(seq_id, num_tokens, prefix) // max(1, self.num_groups)
        if not num_new and tables is not None:
            return NO_BLOCKS  # a decode inside its last block: the common case
        if tables is None:
            if self.states is not None:
                slot = self.states.take(seq_id)
                if prefix.snapshot is not None:
                    self.state_copies.append((prefix.snapshot, slot))
            tables = self._blocks[seq_id] = [array("i") for _ in self.policies]
            self._hashes[seq_id] = list(prefix.hashes)
            self._released_upto[seq_id] = [0] * self.num_groups
        hits = prefix.block_ids or ((),) * len(tables)
        # every group's hit blocks first: a free hit block of a later group must not be taken as new
        self.pool.touch([b for hit in hits for b in hit if b != RELEASED])
        if prefix.loads:
            hits = self._copy_back(prefix)
        added = []
        for hit, table in zip(hits, tables):
            new = hit + tuple(self.pool.take(num_new))
            table.extend(new)
            added.append(new)
        return KVCacheBlocks(tuple(added))

    def _copy_back(self, prefix: PrefixHit) -> tuple[tuple[int, ...], ...]:
        """The hit's tables with a fresh device block for each block in the host tier, its copy
        queued (after the offloads of the blocks that taking them evicts) and its hash set."""
        assert self.host is not None
        tables = [list(table) for table in prefix.block_ids]
        with self.host.pinned(host_block for _, _, host_block in prefix.loads):
            blocks = self.pool.take(len(prefix.loads))
        for (g, i, host_block), block in zip(prefix.loads, blocks):
            tables[g][i] = block
            self.transfers.append(BlockCopy(False, block, host_block))
            self.pool.set_hash(block, (g, prefix.hashes[i]))
            self.host.use((g, prefix.hashes[i]))
        return tuple(map(tuple, tables))

    def release_unreachable(self, seq_id, num_computed_tokens: int) -> None:
        """Release the blocks of bounded groups that no query at positions >= num_computed_tokens
        reads (a window's past, a layout's non-vertical past): cached ones stay findable."""
        if not self._bounded:
            return  # full groups only: every block stays reachable
        tables = self._blocks.get(seq_id)
        if tables is None:
            return
        released_upto = self._released_upto[seq_id]
        for g, (policy, table) in enumerate(zip(self.policies, tables)):
            first = min(policy.first_kept(num_computed_tokens), len(table))
            if first <= released_upto[g]:
                continue  # a full group (first is 0), or nothing new fell out of reach
            released = [i for i in range(released_upto[g], first) if table[i] != RELEASED and not policy.keeps_always(i)]
            self.pool.release([table[i] for i in released])  # oldest first: evicted first
            for i in released:
                table[i] = RELEASED
            released_upto[g] = first

    def record_prefix_query(self, num_prompt_tokens: int, prefix: PrefixHit) -> None:
        """Count one admission's prompt tokens and how many of them the cache served."""
        self.prefix_query_tokens += num_prompt_tokens
        self.prefix_hit_tokens += prefix.num_tokens
        self.prefix_host_hit_tokens += prefix.host_tokens

    def cache_computed(self, seq_id, token_ids: list[int], num_computed_tokens: int) -> None:
        """Register the sequence's full blocks whose KV is now computed (in every group that holds them)."""
        if not self.enable_prefix_caching:
            return
        hashes, tables = self._hashes[seq_id], self._blocks[seq_id]
        bs = self.block_size
        for i in range(len(hashes), num_computed_tokens // bs):
            hashes.append(chain_hash(hashes[-1] if hashes else None, token_ids[i * bs:(i + 1) * bs]))
            for g, table in enumerate(tables):
                if table[i] != RELEASED:
                    self.pool.set_hash(table[i], (g, hashes[-1]))
        self._snapshot(seq_id, num_computed_tokens)

    def _snapshot(self, seq_id, num_computed_tokens: int) -> None:
        """Queue a copy of the sequence's state into a snapshot if its computed tokens end at a
        snapshot point (a chunk that reaches one ends there: `chunk_tokens`)."""
        if self.snapshots is None or not num_computed_tokens or num_computed_tokens % self.snapshots.interval:
            return
        assert self.states is not None
        slot = self.snapshots.save(self._hashes[seq_id][num_computed_tokens // self.block_size - 1])
        if slot is not None:
            self.state_copies.append((self.states.slot(seq_id), slot))

    def free(self, seq_id, keep_for: float | None = None) -> None:
        """Return all of the sequence's blocks (tail first, so its head stays cached longest).
        `keep_for` seconds: the host tier evicts none of its cached blocks before then."""
        tables = self._blocks.pop(seq_id, ())
        if self.states is not None:
            self.states.free(seq_id)
        hashes = self._hashes.pop(seq_id, [])
        if keep_for and self.host is not None:
            self.host.keep([(g, h) for g in range(self.num_groups) for h in hashes], self.host.clock() + keep_for)
        self._released_upto.pop(seq_id, None)
        for table in tables:
            self.pool.release([b for b in reversed(table) if b != RELEASED])


def _one_full_group(block_size: int) -> CacheGroup:
    """The group of a pool whose every layer keeps its whole context (layer names are unused here)."""
    return CacheGroup(FULL, (), (), block_size, (), "f32")
