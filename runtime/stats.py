"""A snapshot of the engine's counters, for logs and the server's metrics endpoint.

Per-request timings (arrival, first token, finish) travel on each `RequestOutput.metrics`.
"""

from dataclasses import dataclass

from kiln.runtime.scheduler import Scheduler


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # sequences (a request with n = 3 counts 3)
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int  # referenced by some sequence
    kv_blocks_free: int  # not referenced (cached ones included: they are reclaimable)
    kv_blocks_cached: int  # holding a prefix-cache entry, used or free
    prefix_cache_query_tokens: int  # prompt tokens of admitted sequences
    prefix_cache_hit_tokens: int  # of those, served from the prefix cache
    prefix_cache_host_hit_tokens: int  # of those, copied back from the host tier
    host_blocks_total: int  # blocks of the KV cache's host tier (0: none)
    host_blocks_used: int  # holding an evicted prefix-cache block
    num_preemptions: int
    prompt_tokens_computed: int  # prompt tokens run through the model (cache hits excluded)
    generation_tokens: int  # tokens sampled

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hit_tokens / max(1, self.prefix_cache_query_tokens)


def collect_stats(scheduler: Scheduler) -> EngineStats:
    kv = scheduler.kv
    return EngineStats(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        kv_blocks_total=kv.pool.num_blocks,
        kv_blocks_used=kv.num_used_blocks,
        kv_blocks_free=kv.num_free_blocks,
        kv_blocks_cached=kv.num_cached_blocks,
        prefix_cache_query_tokens=kv.prefix_query_tokens,
        prefix_cache_hit_tokens=kv.prefix_hit_tokens,
        prefix_cache_host_hit_tokens=kv.prefix_host_hit_tokens,
        host_blocks_total=kv.host.num_blocks if kv.host else 0,
        host_blocks_used=len(kv.host) if kv.host else 0,
        num_preemptions=scheduler.num_preemptions,
        prompt_tokens_computed=scheduler.prompt_tokens_computed,
        generation_tokens=scheduler.generation_tokens,
    )
