"""What every tier spec shares, and what a spec is built with."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt

from ..block_format import BlockCodec
from .base import Health


class TierSpec(BaseModel):
    """Fields every secondary-tier JSON object may carry beside its own."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None  # default: the type ("fs", "obj", ...)
    eviction_policy: str | None = None  # default: the store's
    timeout_s: PositiveFloat = 5.0  # a slower call counts as a failure
    backoff_s: PositiveFloat = 1.0  # first wait before retrying an unhealthy tier
    max_backoff_s: PositiveFloat = 30.0
    workers: PositiveInt = 2  # background threads of the tiered store for this tier
    queue_depth: PositiveInt = 64  # pending jobs before stores are dropped
    # vLLM's per-tier keys. module_path (an out-of-tree tier) is read by the
    # registry before a spec is chosen. enable_kv_events: this tier's stores
    # and evictions are published as KV events. locality: "REMOTE" or "LOCAL"
    # overrides the guess from the address (requests in flight). backpressure:
    # vLLM's detector settings; kvtier drops stores when a tier's queue is full
    # (queue_depth) instead, so they are accepted and not used.
    enable_kv_events: bool = False
    locality: Literal["LOCAL", "REMOTE"] | None = None
    backpressure: dict[str, Any] | None = None

    def health(self) -> Health:
        return Health(self.backoff_s, self.max_backoff_s)


@dataclass(frozen=True)
class TierContext:
    """What the store gives every tier it builds."""

    codec: BlockCodec
    policy_factory: Callable[[str | None], object]  # eviction policy name (None: default) -> policy
