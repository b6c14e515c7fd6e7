"""Which keys a tier holds and the room they take, bounded by a capacity.

Victims are chosen by a CachePolicy and never among pinned keys. A key being
written is reserved: it counts against the capacity and is pinned, but is not
readable until committed; a failed write releases it, exactly once.
Not thread-safe: the owning tier's lock guards it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


class CapacityIndex:
    def __init__(self, capacity: int | None, policy) -> None:
        self.capacity = capacity  # None: unbounded, the index only remembers
        self.policy = policy
        self.used = 0
        self._sizes: dict[str, int] = {}  # committed and reserved keys
        self._pending: set[str] = set()
        self._pins: Counter = Counter()

    def __contains__(self, key: str) -> bool:
        return key in self._sizes and key not in self._pending

    def __len__(self) -> int:
        return len(self._sizes) - len(self._pending)

    def known(self, key: str) -> bool:
        """Committed or being written."""
        return key in self._sizes

    @property
    def pinned(self) -> int:
        return len(self._pins)

    def prefix(self, keys: Iterable[str]) -> int:
        n = 0
        for key in keys:
            if key not in self:
                break
            n += 1
        return n

    def touch(self, key: str) -> None:
        if key in self:
            self.policy.touch(key)

    def is_pinned(self, key: str) -> bool:
        return key in self._pins

    def pin(self, key: str) -> None:
        self._pins[key] += 1

    def unpin(self, key: str) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def reserve(self, key: str, size: int) -> tuple[bool, list[str]]:
        """Make room for `key` (pinned, pending). Returns (reserved, victims):
        victims are forgotten here and must be removed from storage by the
        caller, even when the reservation failed."""
        assert key not in self._sizes, "reserve a key that is not known yet"
        if self.capacity is not None and size > self.capacity:
            return False, []
        victims: list[str] = []
        while self.capacity is not None and self.used + size > self.capacity:
            chosen = self.policy.evict(1, self._pins)
            if not chosen:
                return False, victims
            for victim in chosen:
                self.used -= self._sizes.pop(victim, 0)
                victims.append(victim)
        self._sizes[key] = size
        self.used += size
        self._pending.add(key)
        self.pin(key)
        self.policy.insert(key)
        return True, victims

    def commit(self, key: str) -> None:
        self._pending.discard(key)
        self.unpin(key)

    def release(self, key: str) -> None:
        if key in self._pending:
            self._pending.discard(key)
            self.unpin(key)
            self._forget(key)

    def adopt(self, key: str, size: int) -> tuple[bool, list[str]]:
        """Take in a key already stored (found on start-up or written by another process)."""
        if self.known(key):
            return True, []
        reserved, victims = self.reserve(key, size)
        if reserved:
            self.commit(key)
        return reserved, victims

    def remove(self, key: str) -> bool:
        """Forget a committed key (deleted, found corrupt or missing)."""
        if key not in self:
            return False
        self._forget(key)
        return True

    def _forget(self, key: str) -> None:
        self.used -= self._sizes.pop(key)
        self.policy.remove(key)
