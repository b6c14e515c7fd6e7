"""Tier lookups off the step loop.

"How much of this prompt do the tiers hold?" is answered on the spot when the
CPU tier alone can say (it is memory: no I/O). Otherwise the question goes to
one background thread, which takes every question asked meanwhile and sends
each tier one batched membership call for all of them (a wave); the
scheduler hears "ask again" until the answer is in. A wave that outlives its
deadline answers "nothing": the request computes instead of waiting.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.kvstore.tiered_store import TieredStore

logger = logging.getLogger("kvtier.connectors")


@dataclass
class Lookup:
    keys: list[str]
    tiers: frozenset[str] | None
    deadline: float
    present: dict[str, bool] | None = None  # set when answered
    done: threading.Event = field(default_factory=threading.Event)


class Lookups:
    def __init__(self, store: TieredStore, timeout_s: float, on_answer: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self._on_answer = on_answer  # after each wave: the scheduler has answers to pick up
        self._pending: dict[str, Lookup] = {}  # request -> its lookup, asked or answered
        self._queue: list[Lookup] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def has_secondary(self, tiers: frozenset[str] | None) -> bool:
        return any(tiers is None or name in tiers for name in self.store.secondary_tiers)

    def cpu_presence(self, keys: list[str], tiers: frozenset[str] | None) -> Callable[[str], bool]:
        if tiers is not None and "cpu" not in tiers:
            return lambda key: False
        found = dict(zip(keys, self.store.tiers["cpu"].contains(keys)))
        return lambda key: found.get(key, False)

    def answer(self, request_id: str, keys: list[str], tiers: frozenset[str] | None) -> Callable[[str], bool] | None:
        """Presence of `keys` in every allowed tier, or None while the lookup
        runs (the first call starts it). A lookup asked for other keys is
        replaced."""
        lookup = self._pending.get(request_id)
        if lookup is not None and lookup.keys == keys and lookup.tiers == tiers:
            if lookup.done.is_set():
                present = lookup.present or {}
                return lambda key: present.get(key, False)
            if time.monotonic() < lookup.deadline:
                return None
            logger.warning("tier lookup for %s passed its %.1f s deadline: treated as a miss",
                           request_id, self.timeout_s)
            return lambda key: False
        lookup = Lookup(keys, tiers, time.monotonic() + self.timeout_s)
        self._pending[request_id] = lookup
        with self._wake:
            self._queue.append(lookup)
            self._wake.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kv-lookups", daemon=True)
            self._thread.start()
        return None

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                wave, self._queue = self._queue, []
            self._answer_wave(wave)

    def _answer_wave(self, wave: list[Lookup]) -> None:
        """One store.contains per distinct set of allowed tiers, for every key asked."""
        by_tiers: dict[frozenset[str] | None, list[Lookup]] = {}
        for lookup in wave:
            by_tiers.setdefault(lookup.tiers, []).append(lookup)
        for tiers, lookups in by_tiers.items():
            keys = list(dict.fromkeys(key for lookup in lookups for key in lookup.keys))
            try:
                present = dict(zip(keys, self.store.contains(keys, tiers)))
            except Exception:  # tiers answer misses, not errors; a bug must not wedge requests
                logger.exception("tier lookup failed")
                present = {}
            for lookup in lookups:
                lookup.present = {key: present.get(key, False) for key in lookup.keys}
                lookup.done.set()
        self._on_answer()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
