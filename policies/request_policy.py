"""Request policies: for one new request, may its blocks be stored, which
tiers may it read and write, and how urgent is it.

A user policy is any object with `on_new_request(info) -> decision`, or a plain
function of that shape. `info` has the attributes of RequestInfo; the decision
may be a RequestDecision, a dict with its field names, or None (the default).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class RequestInfo:
    request_id: str
    num_tokens: int
    cache_salt: str | None = None
    priority: int = 0  # lower runs first, as in vLLM
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestDecision:
    store: bool = True
    read_tiers: frozenset[str] | None = None  # None: every tier
    write_tiers: frozenset[str] | None = None
    priority: int = 0

    @classmethod
    def coerce(cls, value: Any) -> "RequestDecision":
        """Accept what a user's policy may return: a decision, a dict or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = set(value) - known
            if unknown:
                raise ValueError(f"unknown request decision fields: {sorted(unknown)}")
            value = dict(value)
            for name in ("read_tiers", "write_tiers"):
                if value.get(name) is not None:
                    value[name] = frozenset(value[name])
            return cls(**value)
        raise TypeError(f"a request policy returned {type(value).__name__}, not a decision")


class DefaultRequestPolicy:
    """Store everything, everywhere; keep the request's own priority."""

    def on_new_request(self, info: RequestInfo) -> RequestDecision:
        return RequestDecision(priority=info.priority)


class SizeThresholdPolicy:
    """Requests shorter than `max_memory_tokens` stay in the memory tiers;
    longer ones (the long contexts worth keeping) go to every tier."""

    def __init__(self, max_memory_tokens: int, memory_tiers: Iterable[str] = ("cpu",)) -> None:
        self.max_memory_tokens = max_memory_tokens
        self.memory_tiers = frozenset(memory_tiers)

    def on_new_request(self, info: RequestInfo) -> RequestDecision:
        if info.num_tokens < self.max_memory_tokens:
            return RequestDecision(write_tiers=self.memory_tiers, priority=info.priority)
        return RequestDecision(priority=info.priority)


class FunctionRequestPolicy:
    """Wraps a plain `on_new_request(info)` function."""

    def __init__(self, function) -> None:
        self._function = function

    def on_new_request(self, info: RequestInfo) -> RequestDecision:
        return RequestDecision.coerce(self._function(info))


class CoercingRequestPolicy:
    """Wraps a user's policy object so that its answers are always RequestDecisions."""

    def __init__(self, policy) -> None:
        self._policy = policy

    def on_new_request(self, info: RequestInfo) -> RequestDecision:
        return RequestDecision.coerce(self._policy.on_new_request(info))
