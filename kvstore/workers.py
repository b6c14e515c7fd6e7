"""Background threads for one tier, fed by a bounded priority queue.

Loads run before stores (a request is waiting on a load; a store only fills
the cache), then by request priority (lower first, as in vLLM), then in order.
A full queue refuses the job: the caller counts it as a miss or a dropped store
instead of waiting.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

LOAD, STORE = 0, 1
_STOP = 2  # sorts after every job, so closing drains the queue first


class TierWorker:
    def __init__(self, name: str, threads: int = 2, depth: int = 64) -> None:
        self.name = name
        self.depth = depth
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = {LOAD: 0, STORE: 0}
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"kv-{name}-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Callable[[], None], kind: int = STORE, priority: int = 0) -> bool:
        """Queue `job`; False if the queue of that kind is full or closed."""
        with self._lock:
            if self._closed or self._pending[kind] >= self.depth:
                return False
            self._pending[kind] += 1
        self._queue.put((kind, priority, next(self._order), job))
        return True

    @property
    def queued(self) -> dict[str, int]:
        with self._lock:
            return {"loads": self._pending[LOAD], "stores": self._pending[STORE]}

    def _run(self) -> None:
        while True:
            kind, _, _, job = self._queue.get()
            if kind == _STOP:
                return
            try:
                job()
            except Exception:  # a job reports its own outcome; this is a bug, keep the thread alive
                logger.exception("worker %s: job failed", self.name)
            finally:
                with self._lock:
                    self._pending[kind] -= 1
                    if not any(self._pending.values()):
                        self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running; False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not any(self._pending.values()), timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued jobs (up to `timeout`), then stop the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._threads:
            self._queue.put((_STOP, 0, next(self._order), None))
        for thread in self._threads:
            thread.join(timeout)
