"""Block pool and KV cache manager: unit behaviour and a Hypothesis model check.

The model check keeps its own token store per block (what the KV cache would hold) and replays
random admissions (with prefix lookups), growth and frees over a small pool, with prompts made
of a few common prefixes and random tails, so prefix hits, sharing, eviction and reuse all
happen often; once with one full cache group, once with a full, a sliding-window and a
block-sparse group sharing the pool (blocks out of reach released as sequences grow); and with
or without a small host tier, whose queued copies the model applies to its own host store.
"""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kiln.contract import BLOCK_SPARSE, FULL, SLIDING_WINDOW, BlockSparseLayout, CacheGroup
from kiln.runtime.kv_cache import RELEASED, BlockPool, KVCacheManager, chain_hash
from kiln.runtime.kv_groups import GroupPolicy

BS = 4


def _group(kind, window=None, layout=None):
    return CacheGroup(kind, (0,), ("k", "v"), BS, ((BS, 1, 8),) * 2, "f32", window, layout)


MIXED = [_group(FULL), _group(SLIDING_WINDOW, window=6), _group(BLOCK_SPARSE, layout=BlockSparseLayout(8, 1, 2))]


def test_chain_hash_depends_on_the_whole_prefix():
    a = chain_hash(None, [1, 2, 3, 4])
    assert chain_hash(a, [5, 6, 7, 8]) != chain_hash(chain_hash(None, [1, 2, 3, 5]), [5, 6, 7, 8])
    assert chain_hash(a, [5, 6, 7, 8]) == chain_hash(chain_hash(None, [1, 2, 3, 4]), [5, 6, 7, 8])


def test_freed_cached_blocks_are_reused_and_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    tokens = list(range(9))  # two full blocks + one token
    a_blocks = list(kv.allocate("a", 9).block_ids)
    kv.cache_computed("a", tokens, 9)
    assert kv.num_cached_blocks == 2
    kv.free("a")
    assert kv.num_free_blocks == 4 and kv.num_cached_blocks == 2
    hit = kv.find_prefix(tokens)
    assert hit.num_tokens == 8 and hit.block_ids == (a_blocks[0][:2],)
    # Uncached free blocks go first (a's uncached tail, then the never-used block) ...
    kv.allocate("b", 4)
    kv.allocate("c", 4)
    assert kv.find_prefix(tokens).num_tokens == 8
    # ... then cached ones, least recently used first: a's blocks were freed tail first.
    kv.allocate("d", 4)
    assert kv.find_prefix(tokens).num_tokens == 4
    kv.allocate("e", 4)
    assert kv.find_prefix(tokens).num_tokens == 0 and kv.num_cached_blocks == 0


def test_prefix_hit_never_covers_the_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    tokens = list(range(8))
    kv.allocate("a", 8)
    kv.cache_computed("a", tokens, 8)
    assert kv.find_prefix(tokens).num_tokens == 4
    assert kv.find_prefix(tokens + [99]).num_tokens == 8


def test_can_allocate_counts_revived_prefix_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    tokens = list(range(9))
    kv.allocate("a", 9)
    kv.cache_computed("a", tokens, 9)
    kv.free("a")
    hit = kv.find_prefix(tokens)
    assert hit.num_tokens == 8
    assert kv.can_allocate("b", 9, hit) and not kv.can_allocate("b", 13, hit)
    kv.allocate("b", 9, hit)
    assert kv.num_free_blocks == 0


def test_growth_inside_the_last_block_adds_nothing_and_block_table_pads():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    kv.allocate("a", 1)
    kv.allocate("b", 9)
    assert kv.allocate("a", 4).block_ids == () and kv.num_free_blocks == 4
    assert len(kv.allocate("a", 5).block_ids[0]) == 1
    (table,) = kv.block_tables(["b", "missing", "a"])
    assert table.dtype.name == "int32"
    assert table.tolist() == [kv.block_ids("b"), [0, 0, 0], kv.block_ids("a") + [0]]


def test_release_more_than_taken_is_an_error():
    pool = BlockPool(2)
    (block,) = pool.take(1)
    pool.release([block])
    with pytest.raises(RuntimeError):
        pool.release([block])
    with pytest.raises(RuntimeError):
        pool.take(3)


def test_a_window_group_releases_blocks_out_of_reach_and_a_hit_needs_only_the_window():
    kv = KVCacheManager(num_blocks=16, block_size=BS, groups=MIXED[:2])
    tokens = list(range(30))
    kv.allocate("a", 29)
    kv.cache_computed("a", tokens, 29)
    kv.release_unreachable("a", 29)  # the next query, at 29, reads positions 24..29: blocks 6, 7
    assert kv.block_ids("a", 1)[:6] == [RELEASED] * 6 and RELEASED not in kv.block_ids("a", 1)[6:]
    assert RELEASED not in kv.block_ids("a", 0) and kv.num_held_blocks("a") == 8 + 2
    assert kv.block_tables(["a"])[1].tolist() == [[0] * 6 + kv.block_ids("a", 1)[6:]]
    kv.free("a")
    hit = kv.find_prefix(tokens)  # the window's released blocks 0..4 are still cached: 28 tokens hit
    assert hit.num_tokens == 28 and hit.block_ids[1][:5] == (RELEASED,) * 5
    assert kv.can_allocate("b", 30, hit)
    kv.allocate("b", 30, hit)
    assert kv.num_held_blocks("b") == 8 + 3  # the window group holds blocks 5, 6 (hit) and 7 (new)


def test_a_window_hit_needs_only_the_blocks_inside_the_window():
    kv = KVCacheManager(num_blocks=16, block_size=BS, groups=MIXED[:2])
    tokens = list(range(30))
    kv.allocate("a", 29)
    kv.cache_computed("a", tokens, 29)
    kv.release_unreachable("a", 29)  # window blocks 0..5 freed (still cached), oldest first in the LRU
    assert kv.num_free_blocks == 6 and kv.find_prefix(tokens).num_tokens == 28
    kv.pool.take(5)  # evicts window blocks 0..4: a hit at 28 tokens reads only blocks 5, 6
    assert kv.find_prefix(tokens).num_tokens == 28
    kv.pool.take(1)  # evicts block 5: no hit point has its window cached any more
    assert kv.find_prefix(tokens).num_tokens == 0


def test_a_block_sparse_group_keeps_its_vertical_blocks():
    policy = GroupPolicy(MIXED[2])  # layout blocks of 8 tokens = 2 KV blocks; stride 2: blocks 2, 3, 6, 7, ... vertical
    assert [policy.keeps_always(b) for b in range(8)] == [False, False, True, True] * 2
    kv = KVCacheManager(num_blocks=32, block_size=BS, groups=MIXED[2:])
    kv.allocate("a", 40)
    kv.release_unreachable("a", 40)  # query block 5 (positions 40..47) sees layout block 5 and 1, 3
    assert [b != RELEASED for b in kv.block_ids("a")] == [False, False, True, True, False, False, True, True,
                                                          False, False]
    assert kv.num_held_blocks("a") == policy.blocks_held(40, 40 + 1) - 1  # less block 10, not allocated yet


def test_capacity_counts_each_group_by_what_it_keeps():
    kv = KVCacheManager(num_blocks=100, block_size=BS, groups=MIXED[:2])
    assert kv.blocks_needed(400, chunk=1) == 100 + 2
    assert kv.capacity_tokens() == 392  # 98 full blocks + the 2 blocks of the window
    assert kv.blocks_needed(400, chunk=40) == 100 + 12


class _Model:
    """KV cache manager under test + what the cache would contain, and the invariant checks."""

    def __init__(self, num_blocks: int, groups=None, host_blocks: int = 0):
        self.kv = KVCacheManager(num_blocks=num_blocks, block_size=BS, groups=groups, host_blocks=host_blocks)
        self.policies = self.kv.policies
        self.store: dict[int, list[int | None]] = {}
        self.host_store: dict[int, list[int | None]] = {}
        self.block_tokens: dict[bytes, list[int]] = {}  # chain hash -> the tokens of its block
        self.seqs: dict[str, tuple[list[int], int]] = {}  # id -> (tokens, num computed)

    def run_transfers(self):
        """What the executor does before a step: the queued host-tier copies, in order."""
        for copy in self.kv.take_transfers():
            if copy.to_host:
                self.host_store[copy.host_block] = list(self.store[copy.device_block])
            else:
                self.store[copy.device_block] = list(self.host_store[copy.host_block])

    def compute(self, seq_id: str, upto: int):
        tokens, done = self.seqs[seq_id]
        for g in range(self.kv.num_groups):
            blocks = self.kv.block_ids(seq_id, g)
            for pos in range(done, upto):
                block = blocks[pos // BS]
                assert self.kv.pool.ref_count(block) == 1, "writing a KV block another sequence shares"
                self.store.setdefault(block, [None] * BS)[pos % BS] = tokens[pos]
        self.seqs[seq_id] = (tokens, upto)
        parent = None
        for i in range(upto // BS):
            parent = chain_hash(parent, tokens[i * BS:(i + 1) * BS])
            self.block_tokens[parent] = tokens[i * BS:(i + 1) * BS]
        self.kv.cache_computed(seq_id, tokens, upto)
        self.kv.release_unreachable(seq_id, upto)

    def check(self):
        pool, refs = self.kv.pool, {}
        for seq_id, (tokens, done) in self.seqs.items():
            held = []
            for g, policy in enumerate(self.policies):
                table = self.kv.block_ids(seq_id, g)
                assert len(table) * BS >= done
                for i, block in enumerate(table):
                    if block == RELEASED:  # only what no query at >= done reads
                        assert i < policy.first_kept(done) and not policy.keeps_always(i)
                        continue
                    held.append(block)
                    if (i + 1) * BS <= done:  # a computed block holds exactly this sequence's tokens
                        assert self.store[block] == tokens[i * BS:(i + 1) * BS]
            assert len(held) == len(set(held))
            for block in held:
                refs[block] = refs.get(block, 0) + 1
        for block in range(pool.num_blocks):
            assert pool.ref_count(block) == refs.get(block, 0) >= 0
        assert pool.num_free == sum(refs.get(b, 0) == 0 for b in range(pool.num_blocks))
        for block, count in refs.items():
            if count > 1:
                assert pool._block_hash[block] is not None, "a block shared without prefix caching"
        host = self.kv.host
        for (_, block_hash), host_block in (host._blocks.items() if host else ()):  # each holds its block's tokens
            assert self.host_store[host_block] == self.block_tokens[block_hash]


PREFIXES = [[0] * 4, [0] * 8, [0] * 4 + [1] * 4, [1, 2] * 2, [1, 2] * 4, [2] * 4]
tokens_st = st.builds(lambda prefix, tail: prefix + tail, st.sampled_from(PREFIXES),
                      st.lists(st.integers(0, 2), min_size=1, max_size=3))


@example(num_blocks=21, grouped=True, host_blocks=0, ops=[  # a free hit block of the block-sparse group once went out as new
    ("a", 0, [0] * 9), ("a", 0, [0] * 9), ("a", 0, [1, 2, 1, 2, 1, 2, 1, 2, 0]), ("a", 0, [0] * 5)])
@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(2, 24), grouped=st.booleans(), host_blocks=st.sampled_from([0, 0, 3, 12]),
       ops=st.lists(st.tuples(st.sampled_from("aaagff"), st.integers(0, 5), tokens_st), max_size=40))
def test_block_pool_model_check(num_blocks, grouped, host_blocks, ops):
    model = _Model(num_blocks, MIXED if grouped else None, host_blocks)
    for n, (op, which, tokens) in enumerate(ops):
        live = sorted(model.seqs)
        if op == "a":
            seq_id = f"s{n}"
            hit = model.kv.find_prefix(tokens)
            assert hit.num_tokens < len(tokens)
            if model.kv.can_allocate(seq_id, len(tokens), hit):
                model.kv.allocate(seq_id, len(tokens), hit)
                model.run_transfers()
                model.seqs[seq_id] = (tokens, hit.num_tokens)
                model.check()  # the hit blocks already hold this sequence's tokens
                model.compute(seq_id, len(tokens))
        elif op == "g" and live:
            seq_id = live[which % len(live)]
            old, done = model.seqs[seq_id]
            if model.kv.can_allocate(seq_id, len(old) + len(tokens)):
                model.kv.allocate(seq_id, len(old) + len(tokens))
                model.run_transfers()
                model.seqs[seq_id] = (old + tokens, done)
                model.compute(seq_id, len(old) + len(tokens))
        elif op == "f" and live:
            seq_id = live[which % len(live)]
            model.kv.free(seq_id)
            model.kv.free(seq_id)  # a second free of the same sequence is a no-op
            del model.seqs[seq_id]
        model.check()
    for seq_id in list(model.seqs):
        model.kv.free(seq_id)
    assert model.kv.num_free_blocks == num_blocks and model.kv.num_used_blocks == 0


@pytest.mark.parametrize("layout", [BlockSparseLayout(4, 1, 2), BlockSparseLayout(8, 2, 3), BlockSparseLayout(16, 1, 4)])
def test_block_sparse_need_counts_the_kept_blocks(layout):
    policy = GroupPolicy(_group(BLOCK_SPARSE, layout=layout))
    for start in range(0, 300, 7):
        end = start + 5
        kept = [b for b in range(-(-end // BS)) if b >= policy.first_kept(start) or policy.keeps_always(b)]
        assert policy.blocks_held(start, end) == len(kept)
