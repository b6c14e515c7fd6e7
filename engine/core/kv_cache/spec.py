"""KV cache specs and how layers are grouped onto one pool of pages.

A group is a set of layers with the same attention spec. Every group draws
pages from one pool, so a page must hold the same bytes in every group: we give
every group the same number of layer slots (`layers_per_group`), splitting a
spec with many layers into several groups, as vLLM's hybrid allocator does.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FullAttentionSpec:
    name = "full"

    def needed_from(self, num_computed_tokens: int) -> int:
        """Earliest token position a query at `num_computed_tokens` may attend to."""
        return 0


@dataclass(frozen=True)
class SlidingWindowSpec:
    window: int
    name = "sliding"

    def needed_from(self, num_computed_tokens: int) -> int:
        # HF semantics: a query at position p sees keys p-W+1 .. p.
        return max(0, num_computed_tokens - self.window + 1)


AttentionSpec = FullAttentionSpec | SlidingWindowSpec


@dataclass(frozen=True)
class KVCacheGroup:
    index: int
    spec: AttentionSpec
    layers: tuple[int, ...]  # model layer indices; slot i of a page holds layers[i]

    @property
    def label(self) -> str:
        if isinstance(self.spec, SlidingWindowSpec):
            return f"g{self.index}-sliding{self.spec.window}"
        return f"g{self.index}-full"


def spec_for_layer(layer_type: str, sliding_window: int | None) -> AttentionSpec:
    if layer_type == "sliding_attention" and sliding_window:
        return SlidingWindowSpec(sliding_window)
    return FullAttentionSpec()


def build_kv_cache_groups(layer_types: list[str], sliding_window: int | None) -> list[KVCacheGroup]:
    by_spec: dict[AttentionSpec, list[int]] = {}
    for layer, layer_type in enumerate(layer_types):
        by_spec.setdefault(spec_for_layer(layer_type, sliding_window), []).append(layer)
    group_size = min(len(layers) for layers in by_spec.values())
    groups: list[KVCacheGroup] = []
    # Full attention first: the hit search starts from the group that bounds it.
    for spec in sorted(by_spec, key=lambda s: isinstance(s, SlidingWindowSpec)):
        layers = by_spec[spec]
        for start in range(0, len(layers), group_size):
            groups.append(KVCacheGroup(len(groups), spec, tuple(layers[start:start + group_size])))
    return groups


def layers_per_page(groups: list[KVCacheGroup]) -> int:
    return max(len(g.layers) for g in groups)
