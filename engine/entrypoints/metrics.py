"""Prometheus exposition of the engine's counters.

A custom collector reads `engine.stats()` at scrape time: the engine keeps
plain counters and never calls into prometheus_client on its hot path. Each
server gets its own CollectorRegistry, so several engines can live in one
process (tests) without name clashes."""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kvtier.engine.core.stats import EngineStats

# (metric name, EngineStats attribute, help)
_GAUGES = [
    ("kvtier_requests_running", "num_running", "Requests in the running batch."),
    ("kvtier_requests_waiting", "num_waiting", "Requests waiting to be scheduled."),
    ("kvtier_kv_cache_usage_ratio", "kv_cache_usage", "Fraction of the device KV cache pool in use (0..1)."),
]
_COUNTERS = [
    ("kvtier_prompt_tokens", "prompt_tokens_total", "Prompt tokens received."),
    ("kvtier_generation_tokens", "generation_tokens_total", "Tokens generated."),
    ("kvtier_prefix_cache_queries", "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."),
    ("kvtier_prefix_cache_hits", "prefix_cache_hits_total", "Prompt tokens found in the prefix cache."),
    ("kvtier_num_preemptions", "num_preemptions_total", "Requests preempted for lack of KV cache blocks."),
    ("kvtier_preemption_swapped_out_blocks", "preemption_swapped_out_blocks_total",
     "Device blocks preempted requests gave up with their KV kept in the CPU tier."),
    ("kvtier_preemption_swapped_in_blocks", "preemption_swapped_in_blocks_total",
     "Device blocks loaded back into resumed requests."),
    ("kvtier_preemption_swap_fallbacks", "preemption_swap_fallbacks_total",
     "Swapped-out requests that recomputed after all (copy declined, lost or failed to load)."),
    ("kvtier_preemption_recomputed_tokens", "preemption_recomputed_tokens_total",
     "Tokens computed again because their request was preempted."),
]
# Per KV tier: (metric name, key in EngineStats.tiers[tier], help)
_TIER_COUNTERS = [
    ("kvtier_kv_tier_lookup_tokens", "lookup_tokens", "Tokens looked up in the tier."),
    ("kvtier_kv_tier_hit_tokens", "hit_tokens", "Tokens found in the tier."),
    ("kvtier_kv_tier_errors", "errors", "Failed tier operations."),
    ("kvtier_kv_tier_corrupt_blocks", "corrupt_blocks", "Blocks read back corrupt, short or foreign, and dropped."),
]


class EngineStatsCollector(Collector):
    def __init__(self, read_stats: Callable[[], EngineStats]):
        self._read_stats = read_stats

    def collect(self) -> Iterator[Metric]:
        stats = self._read_stats()
        for name, attr, doc in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=getattr(stats, attr))
        for name, attr, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=getattr(stats, attr))
        group_usage = GaugeMetricFamily("kvtier_kv_cache_group_usage_ratio",
                                        "Fraction of the KV cache pool held by each KV cache group.",
                                        labels=["group"])
        for group, usage in stats.kv_cache_usage_per_group.items():
            group_usage.add_metric([group], usage)
        yield group_usage
        yield _histogram("kvtier_time_to_first_token_seconds", "Time from arrival to first token.",
                         stats.ttft_buckets, stats.ttft_bucket_counts, stats.ttft_sum)
        yield _histogram("kvtier_preemption_restore_seconds",
                         "Time to load a preempted request's swapped KV back.",
                         stats.restore.buckets, stats.restore.counts, stats.restore.sum)
        yield from _tier_metrics(stats.tiers)


def _histogram(name: str, doc: str, bounds: list[float], counts: list[int], total: float) -> HistogramMetricFamily:
    # The engine keeps per-bucket counts; Prometheus buckets are cumulative.
    buckets, running = [], 0
    for le, count in zip([*bounds, float("inf")], counts):
        running += count
        buckets.append((floatToGoString(le), running))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


def _tier_metrics(tiers: dict[str, dict[str, float]]) -> Iterator[Metric]:
    for name, key, doc in _TIER_COUNTERS:
        family = CounterMetricFamily(name, doc, labels=["tier"])
        for tier, values in tiers.items():
            family.add_metric([tier], values.get(key, 0))
        yield family
    moved = CounterMetricFamily("kvtier_kv_tier_bytes", "Bytes moved into (stored) and out of (loaded) the tier.",
                                labels=["tier", "direction"])
    usage = GaugeMetricFamily("kvtier_kv_tier_usage_bytes", "Bytes held by the tier.", labels=["tier"])
    for tier, values in tiers.items():
        moved.add_metric([tier, "in"], values.get("bytes_in", 0))
        moved.add_metric([tier, "out"], values.get("bytes_out", 0))
        usage.add_metric([tier], values.get("usage_bytes", 0))
    yield moved
    yield usage


def make_registry(read_stats: Callable[[], EngineStats]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineStatsCollector(read_stats))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition body and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
