"""What the daemon holds: opaque objects under keys, in a memory pool bounded
by bytes, written through to an optional fs tier that survives a restart.

The memory pool evicts through a CachePolicy once it passes its high-water
mark and never grows past its capacity: a put that cannot fit (everything
left is leased) is refused. Keys being sent to a client are leased: they
cannot be evicted until the transport has let go of their bytes, so the
bytes the pool counts are the bytes it holds. A namespace (the key's first
segment) is a tenant; one with a quota evicts its own objects to stay under
it and never another tenant's.

Not thread-safe: the daemon's event loop owns it. Only the fs writer runs
beside it, behind its own lock.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Container

from ..tiers.capacity import CapacityIndex
from ..tiers.fs import FsBackend
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


class Persistence:
    """The fs tier below the memory pool: write-through on a background
    thread (a full queue drops the write, never blocks the loop), read back on
    a miss, and rebuilt from the directory on start."""

    def __init__(self, root: str, capacity: int | None, policy, queue_depth: int) -> None:
        import fsspec

        fs, path = fsspec.core.url_to_fs(root)
        self.backend = FsBackend(fs, path, read_threads=1, write_threads=1)
        self._lock = threading.Lock()
        self._index = CapacityIndex(capacity, policy)
        self._queue: queue.Queue = queue.Queue(queue_depth)
        self.dropped = 0
        self.evictions = 0
        self.errors = 0
        self._rebuild()
        self._writer = threading.Thread(target=self._write_loop, name="kvstore-fs-writer", daemon=True)
        self._writer.start()

    def _rebuild(self) -> None:
        excess = []
        for name, size, _ in sorted(self.backend.scan(), key=lambda entry: entry[2]):  # oldest first
            reserved, victims = self._index.adopt(name, size)
            excess.extend(victims if reserved else [*victims, name])
        if excess:
            self.backend.delete(excess)

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def used(self) -> int:
        with self._lock:
            return self._index.used

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def write(self, key: str, frames: tuple, size: int) -> None:
        try:
            self._queue.put_nowait((key, frames, size))
        except queue.Full:
            self.dropped += 1

    def read(self, key: str) -> bytearray | None:
        if key not in self:
            return None
        got: list[bytearray] = []

        def sink(_, reader, size: int) -> None:
            data = bytearray(size)
            if reader.readinto(data) == size:
                got.append(data)

        try:
            self.backend.read([key], sink)
        except OSError:
            self.errors += 1
        if not got:  # vanished or short: forget it
            self.delete([key])
            return None
        with self._lock:
            self._index.touch(key)
        return got[0]

    def delete(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._index.remove(key)
                self._index.release(key)
        try:
            self.backend.delete(keys)
        except OSError:
            self.errors += 1

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._persist(*item)
            finally:
                self._queue.task_done()

    def _persist(self, key: str, frames: tuple, size: int) -> None:
        with self._lock:
            if self._index.known(key):
                return
            reserved, victims = self._index.reserve(key, size)
        error = None
        try:
            if victims:
                self.backend.delete(victims)
                self.evictions += len(victims)
            if reserved:
                error = self.backend.write([key], [list(frames)])[0]
        except Exception as failure:  # the disk failed: the memory copy still serves
            error = failure
        with self._lock:
            if reserved and error is None:
                self._index.commit(key)
            elif reserved:
                self._index.release(key)
        if not reserved:
            self.dropped += 1
        elif error is not None:
            self.errors += 1
            logger.warning("store: persisting %s failed: %s", key, error)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until the queued writes are on disk (a clean shutdown, tests)."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks and (left := deadline - time.monotonic()) > 0:
                self._queue.all_tasks_done.wait(left)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=30)
        self.backend.close()


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
            "fs": None if fs is None else {"objects": len(fs), "used_bytes": fs.used, "dropped": fs.dropped,
                                           "evictions": fs.evictions, "errors": fs.errors},
        }
