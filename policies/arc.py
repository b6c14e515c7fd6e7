"""Adaptive Replacement Cache (Megiddo and Modha, FAST '03).

T1 holds keys used once recently, T2 keys used at least twice; B1 and B2
remember (as ghosts, without data) keys recently evicted from T1 and T2. A
ghost hit moves `p`, the target size of T1, toward the list that would have
kept the key, so the split between recency and frequency adapts to the load.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Hashable

from .cache_policy import CachePolicy
from .lru import pop_oldest


class ARCPolicy(CachePolicy):
    def __init__(self, capacity: int | None = None) -> None:
        # The tier sizes itself in bytes, not entries: unless told, take the
        # largest resident count seen as ARC's cache size c.
        self._fixed_capacity = capacity
        self._c = capacity or 0
        self._p = 0.0
        self._t1: OrderedDict = OrderedDict()
        self._t2: OrderedDict = OrderedDict()
        self._b1: OrderedDict = OrderedDict()
        self._b2: OrderedDict = OrderedDict()

    def insert(self, key: Hashable) -> None:
        if key in self._t1 or key in self._t2:
            self.touch(key)
            return
        if key in self._b1:
            self._p = min(self._c, self._p + max(len(self._b2) / len(self._b1), 1))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self._p = max(0.0, self._p - max(len(self._b1) / len(self._b2), 1))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        if self._fixed_capacity is None:
            self._c = max(self._c, len(self._t1) + len(self._t2))
        self._trim_ghosts()

    def touch(self, key: Hashable) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._t1.pop(key, None)
        self._t2.pop(key, None)

    def evict(self, n: int, protected: Container = frozenset()) -> list:
        victims = []
        while len(victims) < n:
            lists = [(self._t1, self._b1), (self._t2, self._b2)]
            if not (self._t1 and (len(self._t1) > self._p or not self._t2)):
                lists.reverse()
            for resident, ghosts in lists:
                key = pop_oldest(resident, protected)
                if key is not None:
                    ghosts[key] = None
                    victims.append(key)
                    break
            else:
                break
        self._trim_ghosts()
        return victims

    def _trim_ghosts(self) -> None:
        while self._b1 and len(self._t1) + len(self._b1) > self._c:
            self._b1.popitem(last=False)
        while self._b2 and len(self._t1) + len(self._t2) + len(self._b1) + len(self._b2) > 2 * self._c:
            self._b2.popitem(last=False)

    def clear(self) -> None:
        for part in (self._t1, self._t2, self._b1, self._b2):
            part.clear()
        self._p = 0.0

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)
