"""The state pool's bookkeeping in the KV manager: a slot per sequence (admission waits while none
is free; finishing returns it), snapshots at every `snapshot_interval` tokens that a prefix hit
restores, and that leave with the block they end at."""

import pytest

from kiln.errors import KilnError
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.state_pool import StateSnapshots, copy_slots


def test_each_sequence_holds_a_slot_and_a_new_one_waits_for_a_free_slot():
    kv = KVCacheManager(num_blocks=16, block_size=4, state_slots=2)
    assert not kv.enable_prefix_caching  # no snapshot interval: a hit could not restore the state
    for seq in "ab":
        assert kv.can_allocate(seq, 5)
        kv.allocate(seq, 5)
    assert not kv.can_allocate("c", 5) and kv.can_allocate("a", 9)  # c needs a slot; a holds one
    assert sorted(kv.state_indices(["a", "b"]).tolist()) == [0, 1]
    kv.free("a")
    assert kv.can_allocate("c", 5)
    kv.allocate("c", 5)
    assert kv.state_indices(["c"]).tolist() == [0]  # a's slot, reused


def test_snapshots_are_saved_at_interval_points_restored_by_hits_and_evicted_with_their_block():
    kv = KVCacheManager(num_blocks=6, block_size=4, state_slots=4, snapshot_interval=8)
    assert kv.states.num_slots == 2 and kv.enable_prefix_caching  # the other two slots hold snapshots
    assert kv.chunk_tokens(0, 20) == 8 and kv.chunk_tokens(8, 3) == 3 and kv.chunk_tokens(5, 9) == 3
    tokens = list(range(12))
    kv.allocate("a", 8)
    kv.cache_computed("a", tokens, 8)
    (source, snapshot), = kv.take_state_copies()
    assert source == kv.state_indices(["a"])[0] and snapshot >= 2 and kv.take_state_copies() == []
    kv.cache_computed("a", tokens, 8)  # the same point again: saved once
    assert kv.take_state_copies() == []
    hit = kv.find_prefix(tokens[:10] + [99])
    assert (hit.num_tokens, hit.snapshot) == (8, snapshot)
    kv.allocate("b", 11, hit)
    assert kv.take_state_copies() == [(snapshot, kv.state_indices(["b"])[0])]
    assert kv.find_prefix(tokens[:7] + [99]).num_tokens == 0  # 4 cached tokens: no snapshot there
    kv.free("a")
    kv.free("b")
    kv.allocate("c", 24)  # takes every block, evicting the cached ones
    assert kv.find_prefix(tokens[:10] + [99]).num_tokens == 0 and len(kv.snapshots) == 0


def test_snapshot_slots_evict_the_least_recently_used():
    snapshots = StateSnapshots(first=4, count=2, interval=16)
    first, second = snapshots.save(b"a"), snapshots.save(b"b")
    assert {first, second} == {4, 5} and snapshots.save(b"a") is None
    snapshots.lookup(b"a")  # b is now the least recently used
    assert snapshots.save(b"c") == second and snapshots.lookup(b"b") is None and snapshots.lookup(b"a") == first


def test_copies_run_in_order():
    import torch

    pool = {"s": torch.arange(4.0)[:, None].repeat(1, 3)}
    copy_slots(pool, [(0, 2), (2, 3), (1, 0)])
    assert pool["s"][:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_an_interval_off_the_block_size_is_refused():
    with pytest.raises(KilnError, match="not a multiple of the block size 16"):
        KVCacheManager(num_blocks=4, block_size=16, state_slots=4, snapshot_interval=24)
