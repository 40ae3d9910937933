"""The host tier: its bookkeeping (LRU, kept and pinned entries), its copies against plain
indexing, and what the KV manager does with it when a step fails."""

import pytest
import torch

from kiln.errors import KilnError
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.kv_tiers import BlockCopy, HostBlocks, HostTier

BS = 4


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_least_recently_used_entry_goes_first():
    tier = HostTier(2)
    assert tier.save("a") == 0 and tier.save("b") == 1
    assert tier.save("a") is None  # already held: refreshed, no copy
    assert tier.save("c") == 1 and tier.lookup("b") is None  # b was the least recently used
    tier.use("a")
    assert tier.save("d") == 1 and tier.lookup("c") is None and tier.lookup("a") == 0


def test_kept_entries_outlive_their_time_only():
    clock = Clock()
    tier = HostTier(2, clock)
    tier.save("a"), tier.save("b")
    tier.keep(["a", "not-here-yet"], until=10.0)
    assert tier.save("c") == 1 and tier.lookup("a") == 0  # b went, although a was older
    tier.keep(["c"], until=5.0)
    assert tier.save("d") is None and len(tier) == 2  # everything kept: d is not saved
    clock.now = 6.0
    assert tier.save("d") == 1 and tier.lookup("c") is None
    clock.now = 11.0
    assert tier.save("e") == 0 and tier.lookup("a") is None


def test_pinned_entries_are_not_reused_while_copied_back():
    tier = HostTier(2)
    tier.save("a"), tier.save("b")
    with tier.pinned([0]):
        assert tier.save("c") == 1  # a (block 0) is older but pinned
    assert tier.save("d") == 0
    tier.drop(0)
    assert tier.lookup("d") is None and tier.save("e") == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_copies_run_in_order_and_the_last_write_to_a_block_wins(device):
    """On the CPU, and on the GPU machine between a CUDA pool and pinned host memory."""
    pool = torch.arange(6 * 3, dtype=torch.float32, device=device).view(6, 3)
    other = pool.clone() * 10  # a second slot tensor of the pool
    host = HostBlocks([pool, other], 4)
    host.run([BlockCopy(True, 1, 0), BlockCopy(True, 2, 3), BlockCopy(True, 4, 0)])
    expected = [pool.cpu(), other.cpu()]
    assert torch.equal(host.host_tensors[0][[0, 3]], expected[0][[4, 2]])
    assert torch.equal(host.host_tensors[1][0], expected[1][4])
    host.run([BlockCopy(False, 5, 3), BlockCopy(False, 0, 0), BlockCopy(True, 5, 1)])
    for tensor, before in zip((pool.cpu(), other.cpu()), expected):
        assert torch.equal(tensor[5], before[2]) and torch.equal(tensor[0], before[4])
    assert torch.equal(host.host_tensors[0][1], expected[0][2])  # the offload after the load saw the loaded block


def _offload(kv: KVCacheManager, tokens: list[int]) -> list[BlockCopy]:
    """Compute `tokens` (9, two full blocks) in a pool of 3, then fill the pool with another
    sequence: the two cached blocks are evicted; the copies queued."""
    kv.allocate("a", 9)
    kv.cache_computed("a", tokens, 8)
    kv.free("a")
    kv.allocate("b", 12)
    kv.free("b")
    return kv.take_transfers()


def test_evicted_blocks_go_to_the_tier_and_a_hit_copies_them_back():
    kv = KVCacheManager(num_blocks=3, block_size=BS, host_blocks=4)
    tokens = list(range(9))
    assert [c.to_host for c in _offload(kv, tokens)] == [True, True] and len(kv.host) == 2
    hit = kv.find_prefix(tokens)
    assert hit.num_tokens == 8 and hit.host_tokens == 8 and hit.block_ids == ((-1, -1),)
    assert kv.can_allocate("c", 9, hit)
    blocks = kv.allocate("c", 9, hit).block_ids[0]
    loads = kv.take_transfers()
    assert [(c.to_host, c.device_block) for c in loads] == [(False, blocks[0]), (False, blocks[1])]
    assert [c.host_block for c in loads] == [kv.host.lookup((0, h)) for h in hit.hashes]  # the tier keeps them
    assert kv.pool.lookup((0, hit.hashes[1])) == blocks[1]  # on the device again
    kv.free("c")
    kv.allocate("d", 12)
    assert kv.take_transfers() == []  # evicted again, but the tier holds them already


def test_a_failed_step_forgets_what_its_copies_would_have_filled():
    kv = KVCacheManager(num_blocks=3, block_size=BS, host_blocks=4)
    _offload(kv, list(range(9)))
    hit = kv.find_prefix(list(range(5)))
    kv.allocate("c", 5, hit)
    kv.forget_transfers(kv.take_transfers())  # the load may not have run: its block is not findable
    assert kv.pool.lookup((0, hit.hashes[0])) is None and kv.find_prefix(list(range(5))).host_tokens == 4
    kv.free("c")
    kv.forget_transfers(_offload(kv, list(range(100, 109))))  # offloads that may not have run
    assert len(kv.host) == 2 and kv.find_prefix(list(range(100, 109))).num_tokens == 0


def test_recurrent_models_are_refused_a_host_tier():
    with pytest.raises(KilnError, match="recurrent-state snapshots"):
        KVCacheManager(num_blocks=8, block_size=BS, state_slots=4, snapshot_interval=BS, host_blocks=4)
