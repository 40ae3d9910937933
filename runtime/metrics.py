"""Prometheus metrics of one server instance, in its own registry (never the global one).

Engine gauges and counters are read from the latest `EngineStats` snapshot at scrape time;
per-request latencies are observed when a request finishes (on the engine thread; prometheus
client objects are thread-safe). TTFT, TPOT and E2E follow vLLM's definitions: TTFT = first
token - arrival, TPOT = (finish - first token) / (output tokens - 1), E2E = finish - arrival.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kiln.runtime.request import RequestOutput
from kiln.runtime.stats import EngineStats

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineStatsCollector:
    """Exposes an EngineStats snapshot (taken by `read()` at scrape time) as metric families."""

    def __init__(self, read: Callable[[], EngineStats]):
        self._read = read

    def collect(self):
        s = self._read()
        gauges = {
            "kiln_num_requests_running": ("Sequences being generated (a request with n=k counts k)", s.num_running),
            "kiln_num_requests_waiting": ("Sequences waiting to be scheduled", s.num_waiting),
            "kiln_kv_cache_blocks_total": ("KV-cache blocks in the pool", s.kv_blocks_total),
            "kiln_kv_cache_blocks_used": ("KV-cache blocks referenced by a sequence", s.kv_blocks_used),
            "kiln_kv_cache_blocks_free": ("KV-cache blocks not referenced (cached ones included)", s.kv_blocks_free),
            "kiln_kv_cache_blocks_cached": ("KV-cache blocks holding a prefix-cache entry", s.kv_blocks_cached),
            "kiln_kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use, 0..1", s.kv_usage),
            "kiln_host_cache_blocks_total": ("Blocks of the KV cache's host tier (0: no tier)", s.host_blocks_total),
            "kiln_host_cache_blocks_used": ("Host-tier blocks holding an evicted prefix-cache block",
                                            s.host_blocks_used),
        }
        counters = {
            "kiln_prefix_cache_queries": ("Prompt tokens looked up in the prefix cache", s.prefix_cache_query_tokens),
            "kiln_prefix_cache_hits": ("Prompt tokens served from the prefix cache", s.prefix_cache_hit_tokens),
            "kiln_num_preemptions": ("Sequences preempted (KV dropped, recomputed later)", s.num_preemptions),
            "kiln_prompt_tokens_computed": ("Prompt tokens run through the model (cache hits excluded, "
                                            "recomputation included)", s.prompt_tokens_computed),
            "kiln_generation_tokens": ("Tokens sampled", s.generation_tokens),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        tiers = CounterMetricFamily("kiln_prefix_cache_tier_hits", "Prompt tokens served from the prefix cache, by "
                                    "the tier that held their blocks", labels=["tier"])
        tiers.add_metric(["device"], s.prefix_cache_hit_tokens - s.prefix_cache_host_hit_tokens)
        tiers.add_metric(["host"], s.prefix_cache_host_hit_tokens)
        yield tiers


class ServerMetrics:
    """The registry behind GET /metrics."""

    def __init__(self, read_stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(read_stats))
        self.requests = Counter("kiln_request_success", "Finished requests by finish reason (abort: client "
                                "disconnected or the engine failed)", ["finished_reason"], registry=self.registry)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=self.registry)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Arrival to first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("kiln_time_per_output_token_seconds", "Mean time between a request's output tokens "
                              "after the first", buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "Arrival to finish", buckets=E2E_BUCKETS,
                             registry=self.registry)

    def observe_finished(self, output: RequestOutput) -> None:
        """Count a finished request; latencies only for requests that ran to their end."""
        reasons = {c.finish_reason for c in output.outputs}
        reason = "abort" if "abort" in reasons else "length" if reasons == {"length"} else "stop"
        self.requests.labels(finished_reason=reason).inc()
        m = output.metrics
        self.prompt_tokens.inc(m.num_prompt_tokens)
        if reason == "abort" or m.first_token_time is None:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        self.e2e.observe(m.finish_time - m.arrival_time)
        per_sequence_tokens = m.num_generation_tokens / len(output.outputs)
        if per_sequence_tokens > 1:
            self.tpot.observe((m.finish_time - m.first_token_time) / (per_sequence_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
