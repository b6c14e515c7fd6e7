"""S3-FIFO (Yang et al., SOSP '23): three FIFO queues instead of a recency list.

New keys enter a small FIFO S (about 10% of the entries) that filters out
one-hit wonders; a key used while in S moves to the main FIFO M, the rest
leave and are remembered in a ghost FIFO G, so that a returning key goes
straight to M. M evicts like CLOCK: a key used since it was last looked at
loses one unit of its (at most 3) frequency and goes round again.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Hashable

from .cache_policy import CachePolicy


class S3FIFOPolicy(CachePolicy):
    def __init__(self, small_ratio: float = 0.1, max_freq: int = 3) -> None:
        self._small_ratio = small_ratio
        self._max_freq = max_freq
        self._small: OrderedDict = OrderedDict()  # key -> freq, oldest first
        self._main: OrderedDict = OrderedDict()
        self._ghost: OrderedDict = OrderedDict()
        self._ghost_limit = 0  # as many ghosts as the most entries seen resident

    def insert(self, key: Hashable) -> None:
        if key in self._small or key in self._main:
            self.touch(key)
            return
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = 0
        else:
            self._small[key] = 0
        self._ghost_limit = max(self._ghost_limit, len(self))

    def touch(self, key: Hashable) -> None:
        for queue in (self._small, self._main):
            if key in queue:
                queue[key] = min(queue[key] + 1, self._max_freq)

    def remove(self, key: Hashable) -> None:
        self._small.pop(key, None)
        self._main.pop(key, None)

    def evict(self, n: int, protected: Container = frozenset()) -> list:
        victims = []
        while len(victims) < n and (key := self._evict_one(protected)) is not None:
            victims.append(key)
        return victims

    def _evict_one(self, protected: Container):
        small_first = not self._main or len(self._small) >= self._small_ratio * len(self)
        steps = (self._from_small, self._from_main) if small_first else (self._from_main, self._from_small)
        for step in steps:
            key = step(protected)
            if key is not None:
                return key
        return None

    def _from_small(self, protected: Container):
        for _ in range(len(self._small)):
            key, freq = self._small.popitem(last=False)
            if key in protected:
                self._small[key] = freq
            elif freq > 0:
                self._main[key] = 0
            else:
                self._ghost[key] = None
                while len(self._ghost) > self._ghost_limit:
                    self._ghost.popitem(last=False)
                return key
        return None

    def _from_main(self, protected: Container):
        for _ in range(len(self._main) * (self._max_freq + 1)):
            key, freq = self._main.popitem(last=False)
            if key in protected:
                self._main[key] = freq
            elif freq > 0:
                self._main[key] = freq - 1
            else:
                return key
        return None

    def clear(self) -> None:
        for queue in (self._small, self._main, self._ghost):
            queue.clear()

    def __len__(self) -> int:
        return len(self._small) + len(self._main)
