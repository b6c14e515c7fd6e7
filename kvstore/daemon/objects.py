"""What the daemon holds: opaque objects under keys, in a memory pool bounded
by bytes, written through to optional persistent tiers (fs, then fs or obj
below it) that survive a restart.

The memory pool evicts through a CachePolicy once it passes its high-water
mark and never grows past its capacity: a put that cannot fit (everything
left is leased) is refused. Keys being sent to a client are leased: they
cannot be evicted until the transport has let go of their bytes, so the
bytes the pool counts are the bytes it holds. A namespace (the key's first
segment) is a tenant; one with a quota evicts its own objects to stay under
it and never another tenant's.

Not thread-safe: the daemon's event loop owns it. Only the persistent
tiers' writer runs beside it, behind its own lock.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Container

from ..tiers.blob import BlobBackend
from ..tiers.capacity import CapacityIndex
from .protocol import NO_ROOM, QUOTA, namespace_of

logger = logging.getLogger(__name__)


class _Entry:
    __slots__ = ("frames", "size", "namespace")

    def __init__(self, frames: tuple, size: int, namespace: str) -> None:
        self.frames = frames  # buffers whose concatenation is the object (zero-copy zmq frames)
        self.size = size
        self.namespace = namespace


class _OutsideNamespace(Container):
    """Keys a namespace's own eviction must not touch: leased ones and every other tenant's."""

    def __init__(self, leases: Counter, entries: dict, namespace: str) -> None:
        self._leases, self._entries, self._namespace = leases, entries, namespace

    def __contains__(self, key) -> bool:
        return key in self._leases or self._entries[key].namespace != self._namespace


class _Level:
    """One persistent tier: a backend and the index of what it holds."""

    def __init__(self, name: str, backend: BlobBackend, capacity: int | None, policy) -> None:
        self.name = name
        self.backend = backend
        self.index = CapacityIndex(capacity, policy)
        self.evictions = 0
        self.errors = 0


class Persistence:
    """The tiers below the memory pool: `fs_path` first, then any further
    secondary tiers (fs, obj). Writes go through to every one of them on a
    background thread (a full queue drops the write, never blocks the loop);
    a miss in memory reads the first tier that holds the key; each index is
    rebuilt from its tier's listing on start, so a restarted daemon (or one
    on a new host, over a shared bucket) serves what was stored before."""

    def __init__(self, levels: list[tuple[str, BlobBackend, int | None]], policy_factory: Callable[[], object],
                 queue_depth: int) -> None:
        self.levels = [_Level(name, backend, capacity, policy_factory()) for name, backend, capacity in levels]
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(queue_depth)
        self.dropped = 0
        for level in self.levels:
            self._rebuild(level)
        self._writer = threading.Thread(target=self._write_loop, name="kvstore-persist", daemon=True)
        self._writer.start()

    @staticmethod
    def _rebuild(level: _Level) -> None:
        excess = []
        try:
            listing = sorted(level.backend.scan(), key=lambda entry: entry[2])  # oldest first
        except Exception as error:  # a tier that is down at start: empty for now, written from here on
            logger.warning("store: cannot list %s: %s", level.name, error)
            level.errors += 1
            return
        for name, size, _ in listing:
            reserved, victims = level.index.adopt(name, size)
            excess.extend(victims if reserved else [*victims, name])
        if excess:
            level.backend.delete(excess)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return any(key in level.index for level in self.levels)

    def write(self, key: str, frames: tuple, size: int) -> None:
        try:
            self._queue.put_nowait((key, frames, size))
        except queue.Full:
            self.dropped += 1

    def read(self, key: str) -> bytearray | None:
        for level in self.levels:
            with self._lock:
                if key not in level.index:
                    continue
            data = self._read(level, key)
            if data is not None:
                return data
        return None

    def _read(self, level: _Level, key: str) -> bytearray | None:
        got: list[bytearray] = []

        def sink(_, reader, size: int) -> None:
            data = bytearray(size)
            if reader.readinto(data) == size:
                got.append(data)

        try:
            level.backend.read([key], sink)
        except Exception:
            level.errors += 1
            return None  # down: a miss here, the tier below may still have it
        with self._lock:
            if not got:  # vanished or short: forget it
                level.index.remove(key)
                level.index.release(key)
            else:
                level.index.touch(key)
        return got[0] if got else None

    def delete(self, keys: list[str]) -> None:
        for level in self.levels:
            with self._lock:
                for key in keys:
                    level.index.remove(key)
                    level.index.release(key)
            try:
                level.backend.delete(keys)
            except Exception:
                level.errors += 1

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                for level in self.levels:
                    self._persist(level, *item)
            finally:
                self._queue.task_done()

    def _persist(self, level: _Level, key: str, frames: tuple, size: int) -> None:
        with self._lock:
            if level.index.known(key):
                return
            reserved, victims = level.index.reserve(key, size)
        error = None
        try:
            if victims:
                level.backend.delete(victims)
                level.evictions += len(victims)
            if reserved:
                error = level.backend.write([key], [list(frames)])[0]
        except Exception as failure:  # the tier failed: the memory copy still serves
            error = failure
        with self._lock:
            if reserved and error is None:
                level.index.commit(key)
            elif reserved:
                level.index.release(key)
        if not reserved:
            self.dropped += 1
        elif error is not None:
            level.errors += 1
            logger.warning("store: persisting %s to %s failed: %s", key, level.name, error)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until the queued writes are stored (a clean shutdown, tests)."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks and (left := deadline - time.monotonic()) > 0:
                self._queue.all_tasks_done.wait(left)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=30)
        for level in self.levels:
            level.backend.close()

    def usage(self) -> dict[str, dict]:
        with self._lock:
            return {level.name: {"objects": len(level.index), "used_bytes": level.index.used,
                                 "evictions": level.evictions, "errors": level.errors, "dropped": self.dropped}
                    for level in self.levels}


class ObjectStore:
    def __init__(self, capacity: int, high_water: float, policy_factory: Callable[[], object], *,
                 quotas: dict[str, int] | None = None, persistence: Persistence | None = None,
                 max_namespaces: int = 1024) -> None:
        self.capacity = capacity
        self.high_water = int(capacity * high_water)
        self.quotas = dict(quotas or {})
        self.persistence = persistence
        self.max_namespaces = max_namespaces
        self._entries: dict[str, _Entry] = {}
        self._policy = policy_factory()
        self._leases: Counter = Counter()
        self.used = 0
        self._namespace_bytes: Counter = Counter()
        self.evictions = 0
        self.refused: Counter = Counter()  # reason -> puts refused

    def __len__(self) -> int:
        return len(self._entries)

    # -- reads ----------------------------------------------------------------

    def contains(self, keys: list[str]) -> list[bool]:
        fs = self.persistence
        return [key in self._entries or (fs is not None and key in fs) for key in keys]

    def get(self, key: str) -> tuple[tuple, bool] | None:
        """(the object's frames, leased), or None for a miss. A leased object
        stays in the pool until release(key)."""
        entry = self._entries.get(key)
        if entry is None and self.persistence is not None:
            data = self.persistence.read(key)
            if data is not None and self._insert(key, (data,), len(data)) == "":
                entry = self._entries[key]
            elif data is not None:  # no room to promote it: served once, outside the pool
                return (data,), False
        if entry is None:
            return None
        self._policy.touch(key)
        self._leases[key] += 1
        return entry.frames, True

    def release(self, keys: list[str]) -> None:
        for key in keys:
            self._leases[key] -= 1
            if self._leases[key] <= 0:
                del self._leases[key]

    # -- writes ---------------------------------------------------------------

    def put(self, key: str, frames: tuple, size: int) -> str | None:
        """None if the key was held already, "" once stored, else why it was refused."""
        if key in self._entries:
            self._policy.touch(key)
            return None
        outcome = self._insert(key, frames, size)
        if outcome == "" and self.persistence is not None:
            self.persistence.write(key, frames, size)
        elif outcome:
            self.refused[outcome] += 1
        return outcome

    def _insert(self, key: str, frames: tuple, size: int) -> str:
        namespace = namespace_of(key)
        quota = self.quotas.get(namespace)
        if quota is not None:
            if size > quota or not self._evict_until(
                    lambda: self._namespace_bytes[namespace] + size <= quota,
                    _OutsideNamespace(self._leases, self._entries, namespace)):
                return QUOTA
        if size > self.capacity:
            return NO_ROOM
        # Past the high-water mark, evict; if leases keep it there, the room
        # between high water and capacity still takes the put.
        self._evict_until(lambda: self.used + size <= self.high_water, self._leases)
        if self.used + size > self.capacity:
            return NO_ROOM
        self._entries[key] = _Entry(frames, size, namespace)
        self.used += size
        self._namespace_bytes[namespace] += size
        self._policy.insert(key)
        return ""

    def _evict_until(self, fits: Callable[[], bool], protected: Container) -> bool:
        while not fits():
            victims = self._policy.evict(1, protected)
            if not victims:
                return False
            for victim in victims:
                self._drop(victim)
                self.evictions += 1
        return True

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            if key in self._entries:
                self._policy.remove(key)
                self._drop(key)
        if self.persistence is not None:
            self.persistence.delete(keys)

    def _drop(self, key: str) -> None:
        # A leased key is never chosen (it is protected), and delete of a leased
        # key only unlinks it: the transport still holds the bytes it is sending.
        entry = self._entries.pop(key)
        self.used -= entry.size
        self._namespace_bytes[entry.namespace] -= entry.size
        if not self._namespace_bytes[entry.namespace]:
            del self._namespace_bytes[entry.namespace]

    # -- what operators see ---------------------------------------------------

    def namespace_usage(self) -> dict[str, int]:
        """Bytes per namespace, the largest `max_namespaces` of them (tenants
        are client-chosen names: the rest are summed under "_other")."""
        top = self._namespace_bytes.most_common(self.max_namespaces)
        rest = self.used - sum(size for _, size in top)
        return dict(top) | ({"_other": rest} if rest else {})

    def usage(self) -> dict:
        fs = self.persistence
        return {
            "objects": len(self._entries),
            "used_bytes": self.used,
            "capacity_bytes": self.capacity,
            "high_water_bytes": self.high_water,
            "leased": len(self._leases),
            "evictions": self.evictions,
            "refused": dict(self.refused),
            "persistent": {} if fs is None else fs.usage(),  # per tier below memory
        }
