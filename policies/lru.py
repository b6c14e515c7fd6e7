"""Least recently used."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Hashable

from .cache_policy import CachePolicy


def pop_oldest(order: OrderedDict, protected: Container):
    """Remove and return the oldest key of `order` not in `protected`, or None."""
    for key in order:
        if key not in protected:
            del order[key]
            return key
    return None


class LRUPolicy(CachePolicy):
    def __init__(self) -> None:
        self._order: OrderedDict = OrderedDict()  # oldest first

    def insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def evict(self, n: int, protected: Container = frozenset()) -> list:
        victims = []
        while len(victims) < n and (key := pop_oldest(self._order, protected)) is not None:
            victims.append(key)
        return victims

    def clear(self) -> None:
        self._order.clear()

    def __len__(self) -> int:
        return len(self._order)
