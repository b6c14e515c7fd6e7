"""Least frequently used; ties go to the least recently used."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Hashable

from .cache_policy import CachePolicy
from .lru import pop_oldest


class LFUPolicy(CachePolicy):
    def __init__(self) -> None:
        self._count: dict = {}
        self._by_count: dict[int, OrderedDict] = {}  # count -> keys, oldest use first

    def _place(self, key: Hashable, count: int) -> None:
        self._count[key] = count
        self._by_count.setdefault(count, OrderedDict())[key] = None

    def _unplace(self, key: Hashable) -> int:
        count = self._count.pop(key)
        bucket = self._by_count[count]
        del bucket[key]
        if not bucket:
            del self._by_count[count]
        return count

    def insert(self, key: Hashable) -> None:
        count = self._unplace(key) if key in self._count else 0
        self._place(key, count + 1)

    def touch(self, key: Hashable) -> None:
        if key in self._count:
            self._place(key, self._unplace(key) + 1)

    def remove(self, key: Hashable) -> None:
        if key in self._count:
            self._unplace(key)

    def evict(self, n: int, protected: Container = frozenset()) -> list:
        victims = []
        for count in sorted(self._by_count):
            bucket = self._by_count[count]
            while len(victims) < n and (key := pop_oldest(bucket, protected)) is not None:
                del self._count[key]
                victims.append(key)
            if not bucket:
                del self._by_count[count]
            if len(victims) == n:
                break
        return victims

    def clear(self) -> None:
        self._count.clear()
        self._by_count.clear()

    def __len__(self) -> int:
        return len(self._count)
