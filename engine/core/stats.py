"""A snapshot of the engine's counters, read by /metrics at scrape time."""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]

RESTORE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class Histogram:
    def __init__(self, buckets: list[float]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def copy(self) -> "Histogram":
        other = Histogram(self.buckets)
        other.counts, other.sum, other.count = list(self.counts), self.sum, self.count
        return other


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    num_preemptions_total: int = 0
    preemption_swapped_out_blocks_total: int = 0
    preemption_swapped_in_blocks_total: int = 0
    preemption_swap_fallbacks_total: int = 0
    preemption_recomputed_tokens_total: int = 0
    restore: Histogram = field(default_factory=lambda: Histogram(RESTORE_BUCKETS))
    kv_cache_usage: float = 0.0
    kv_cache_usage_per_group: dict[str, float] = field(default_factory=dict)
    ttft_buckets: list[float] = field(default_factory=lambda: list(TTFT_BUCKETS))
    ttft_bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS) + 1))
    ttft_sum: float = 0.0
    ttft_count: int = 0
    tiers: dict[str, dict[str, float]] = field(default_factory=dict)
