"""Tiers that keep blocks as serialized objects (fs, obj, redis).

A BlobBackend knows only where bytes live; BlobTier does the rest for all of
them: encoding, verification (a corrupt object is a miss, deleted and
counted), capacity and eviction through a CachePolicy, and write-back
hand-down of victims.
"""
from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import torch

from ..block_format import BlockCodec, CorruptBlockError
from ..buffers import rows_of
from ..fence import WriteFence
from .base import Health, Tier, contains_by_prefix
from .capacity import CapacityIndex

logger = logging.getLogger(__name__)

# sink(position, reader, size): `reader` has read(n) and readinto(buffer) over
# exactly `size` bytes of one object.
Sink = Callable[[int, object, int], None]


def info_mtime(info: dict) -> float:
    """Modification time, in seconds, from an fsspec info dict of any filesystem."""
    value = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created") or 0.0
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.timestamp() if isinstance(value, datetime) else float(value)


class BlobBackend(ABC):
    """Where a tier's bytes live. Names are keys, already safe everywhere.
    Raise on a failure of the whole backend; the tier makes it misses."""

    @abstractmethod
    def write(self, names: Sequence[str], parts: Sequence[list]) -> list[Exception | None]:
        """Store each object (its buffers back to back) atomically; per-object errors."""

    @abstractmethod
    def read(self, names: Sequence[str], sink: Sink) -> None:
        """Call `sink` for each object that exists, possibly from several threads."""

    @abstractmethod
    def exists(self, names: Sequence[str]) -> int:
        """Length of the prefix of `names` that exists."""

    def contains(self, names: Sequence[str]) -> list[bool]:
        """Per name, whether it exists; backends with a batched test override this."""
        return contains_by_prefix(self.exists, list(names))

    @abstractmethod
    def delete(self, names: Sequence[str]) -> None:
        """Remove objects; missing ones are not an error."""

    def siblings(self, names: Sequence[str]) -> list[str]:
        """Every name that deleting `names` removes (those stored with them in one object)."""
        return list(names)

    def scan(self) -> Iterable[tuple[str, int, float]]:
        """(name, size, mtime) of every stored object, to rebuild an index."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Encoded(Sequence):
    """The encoded blocks of a batch, each made when first asked for: on the
    encoder threads ahead of the writer when there are some, else by the writer."""

    def __init__(self, encode, items: list, pool: ThreadPoolExecutor | None) -> None:
        self._encode = encode
        self._items = items
        self._futures = [pool.submit(encode, *item) for item in items] if pool else None

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        return self._futures[i].result() if self._futures else self._encode(*self._items[i])


class BlobTier(Tier):
    def __init__(self, name: str, kind: str, backend: BlobBackend, codec: BlockCodec, *,
                 capacity_bytes: int | None = None, policy=None, indexed: bool = False,
                 health: Health | None = None, encode_threads: int = 2) -> None:
        super().__init__(name, codec.shape, codec.dtype, health)
        self.kind = kind
        self.backend = backend
        self.codec = codec
        self._lock = threading.Lock()
        # Checksums release the GIL: with spare cores, encode a batch on a few threads.
        self._encoders = (ThreadPoolExecutor(encode_threads, thread_name_prefix=f"kv-{name}-encode")
                          if encode_threads > 1 else None)
        self._index: CapacityIndex | None = None
        if indexed or capacity_bytes is not None:
            if policy is None:
                raise ValueError(f"tier {name}: a capacity needs a cache policy")
            self._index = CapacityIndex(capacity_bytes, policy)
            self.bounded = capacity_bytes is not None
            try:
                self._rebuild_index()
            except Exception as error:  # start empty and unhealthy rather than not at all
                self.health.failed(error)
                self.stats.add(errors=1)
                logger.warning("tier %s: rebuilding the index failed: %s", name, error)

    def _rebuild_index(self) -> None:
        """Take in what is already stored, oldest first, so a restarted
        process hits on blocks written before it and its policy ages them right."""
        entries = sorted(self.backend.scan(), key=lambda entry: entry[2])
        excess = []
        for name, size, _ in entries:
            reserved, victims = self._index.adopt(name, size)
            excess.extend(victims)
            if not reserved:
                excess.append(name)
        if excess:  # the capacity shrank since they were written
            self.backend.delete(excess)
            self.stats.add(evictions=len(excess))

    # -- the Tier interface ------------------------------------------------

    def _exists(self, keys: list[str]) -> int:
        if self._index is None:
            return self.backend.exists(keys)
        with self._lock:
            held = self._index.prefix(keys)
        if held == len(keys):
            return held
        # Another process sharing the store may have written the rest.
        found = self.backend.exists(keys[held:])
        self._adopt(keys[held:held + found])
        return held + found

    def _contains(self, keys: list[str]) -> list[bool]:
        if self._index is None:
            return self.backend.contains(keys)
        with self._lock:
            found = [key in self._index for key in keys]
        rest = [i for i, hit in enumerate(found) if not hit]
        if rest:  # another process sharing the store may have written them
            there = self.backend.contains([keys[i] for i in rest])
            for i, hit in zip(rest, there):
                found[i] = hit
            self._adopt([keys[i] for i, hit in zip(rest, there) if hit])
        return found

    def _get(self, keys: list[str], out: Sequence[torch.Tensor]) -> list[bool]:
        pinned = self._pin(keys)
        try:
            found, corrupt, foreign = self._read_into(keys, out)
        finally:
            self._unpin(pinned)
        if corrupt:
            self.stats.add(corrupt=len(corrupt))
            self._forget(corrupt)
        if foreign:
            self.stats.add(foreign=len(foreign))
        if self._index is not None:
            with self._lock:
                for key, hit in zip(keys, found):
                    if hit:
                        self._index.touch(key)
                    else:
                        self._index.remove(key)  # gone behind our back, or not ours to use
            self._adopt([key for key, hit in zip(keys, found) if hit])
        return found

    def _store(self, keys: list[str], tensors) -> list[bool]:
        written = [False] * len(keys)
        chosen, victims = self._reserve(keys)
        if not chosen:
            return written
        try:
            self._evict(victims)
            rows = rows_of(tensors)  # byte arrays made here: no torch calls on the encoder threads
            encoded = _Encoded(self.codec.encode, [(keys[i], rows[i]) for i in chosen], self._encoders)
            errors = self.backend.write([keys[i] for i in chosen], encoded)
        except BaseException:
            self._settle([keys[i] for i in chosen], [True] * len(chosen))
            raise
        failed = [error is not None for error in errors]
        self._settle([keys[i] for i in chosen], failed)
        if all(failed):
            raise errors[0]
        for error in errors:
            if error is not None:
                self._log_failure("writing a block", error)
        self.stats.add(errors=sum(failed), dropped=sum(failed))
        for i, bad in zip(chosen, failed):
            written[i] = not bad
        self._changed("stored", [keys[i] for i in chosen if written[i]])
        return written

    def _delete(self, keys: list[str]) -> None:
        keys = self.backend.siblings(keys)
        self.backend.delete(keys)
        if self._index is not None:
            with self._lock:
                for key in keys:
                    self._index.remove(key)
        self._changed("removed", keys)

    def _usage(self) -> dict:
        if self._index is None:
            return {}
        with self._lock:
            return {
                "blocks": len(self._index),
                "used_bytes": self._index.used,
                "capacity_bytes": self._index.capacity,
                "pinned": self._index.pinned,
            }

    def close(self) -> None:
        if self._encoders:
            self._encoders.shutdown(wait=True)
        self.backend.close()

    # -- bookkeeping -------------------------------------------------------

    def _reserve(self, keys: list[str]) -> tuple[list[int], list[str]]:
        """Positions to write (not held yet, room made) and the victims evicted for them."""
        if self._index is None:
            return list(range(len(keys))), []
        chosen, victims, dropped = [], [], 0
        with self._lock:
            for i, key in enumerate(keys):
                if self._index.known(key):
                    self._index.touch(key)
                    continue
                reserved, evicted = self._index.reserve(key, self.codec.encoded_size(key))
                victims.extend(evicted)
                if reserved:
                    chosen.append(i)
                else:
                    dropped += 1
        self.stats.add(dropped=dropped)
        return chosen, victims

    def _settle(self, keys: list[str], failed: list[bool]) -> None:
        if self._index is None:
            return
        with self._lock:
            for key, bad in zip(keys, failed):
                if bad:
                    self._index.release(key)
                else:
                    self._index.commit(key)

    def _evict(self, victims: list[str]) -> None:
        if not victims:
            return
        gone = self.backend.siblings(victims)
        if len(gone) > len(victims):  # stored with a victim, so deleted with it
            with self._lock:
                for key in gone[len(victims):]:
                    self._index.remove(key)
            victims = gone
        if self.on_evict is not None:
            # Write-back: hand victims down before they are gone (they are
            # no longer indexed, so read them straight from the backend).
            blocks = [torch.empty(self.block_shape, dtype=self.dtype) for _ in victims]
            found, _, _ = self._read_into(victims, blocks)
            kept = [i for i, hit in enumerate(found) if hit]
            if kept:
                self.on_evict([victims[i] for i in kept], [blocks[i] for i in kept])
        self.backend.delete(victims)
        self.stats.add(evictions=len(victims))
        self._changed("removed", victims)

    def _read_into(self, keys: list[str], out: Sequence[torch.Tensor]) -> tuple[list[bool], list[str], list[str]]:
        """Verified reads: which keys were found whole, which were ours but
        damaged, and which were someone else's (another version, model or layout).
        No backend thread writes into `out` once this returns, even one that
        outlived a failed or timed-out read."""
        found = [False] * len(keys)
        corrupt: list[str] = []
        foreign: list[str] = []
        rows = rows_of(out)  # byte arrays made here: no torch calls on the I/O threads
        fence = WriteFence()

        def sink(i: int, reader, size: int) -> None:
            with fence.writing() as allowed:
                if not allowed:
                    return  # the read was given up: the buffer is no longer ours to fill
                try:
                    self.codec.read_into(reader, size, keys[i], rows[i])
                    found[i] = True
                except CorruptBlockError as error:
                    if error.ours:
                        logger.warning("tier %s: dropping %s: %s", self.name, keys[i], error)
                        corrupt.append(keys[i])
                    else:
                        foreign.append(keys[i])

        try:
            self.backend.read(keys, sink)
        finally:
            fence.close()
        return found, corrupt, foreign

    def _adopt(self, keys: list[str]) -> None:
        """Index keys found stored but not indexed (another process wrote them).
        Their exact size is unknown without a stat: the block's size is close."""
        if self._index is None or not keys:
            return
        victims = []
        with self._lock:
            for key in keys:
                if not self._index.known(key):
                    victims.extend(self._index.adopt(key, self.codec.encoded_size(key))[1])
        self._evict(victims)

    def _forget(self, keys: list[str]) -> None:
        keys = self.backend.siblings(keys)
        try:
            self.backend.delete(keys)
        except Exception as error:  # the object stays, but it is no longer trusted
            logger.warning("tier %s: deleting %s failed: %s", self.name, keys, error)
        if self._index is not None:
            with self._lock:
                for key in keys:
                    self._index.remove(key)
        self._changed("removed", keys)

    def _pin(self, keys: list[str]) -> list[str]:
        if self._index is None:
            return []
        with self._lock:
            pinned = [key for key in keys if key in self._index]
            for key in pinned:
                self._index.pin(key)
        return pinned

    def _unpin(self, keys: list[str]) -> None:
        if keys:
            with self._lock:
                for key in keys:
                    self._index.unpin(key)
