"""The tier interface, and what every tier shares: stats and health.

Public methods never raise for a tier failure: an exception from the backend
becomes misses (or a dropped write), is counted, and marks the tier unhealthy
so that it is skipped until a back-off has passed; then one call probes it.
"""
from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

logger = logging.getLogger(__name__)

EvictionHook = Callable[[list[str], list[torch.Tensor]], None]


@dataclass
class TierStats:
    lookups: int = 0  # keys asked for by exists (up to the first miss) and contains
    lookup_hits: int = 0  # ... and found
    reads: int = 0  # keys asked for by get
    hits: int = 0  # blocks served by get
    bytes_in: int = 0  # payload bytes written into the tier
    bytes_out: int = 0  # payload bytes read out of it
    puts: int = 0  # blocks stored
    evictions: int = 0
    corrupt: int = 0  # objects of our format version found truncated or damaged, and dropped
    foreign: int = 0  # objects of another format version, model or layout: misses, left alone
    errors: int = 0
    dropped: int = 0  # blocks not stored: no room, queue full or tier down
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


def contains_by_prefix(exists: Callable[[list[str]], int], keys: list[str]) -> list[bool]:
    """Per key, whether it is held, from a prefix test alone: each call
    skips the first missing key and asks again about the rest."""
    found, start = [False] * len(keys), 0
    while start < len(keys):
        n = exists(keys[start:])
        found[start:start + n] = [True] * n
        start += n + 1
    return found


class Health:
    """Exponential back-off after failures: 1x, 2x, 4x ... `backoff_s`, up to `max_backoff_s`."""

    def __init__(self, backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._failures = 0
        self._retry_at = 0.0
        self.last_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self._failures == 0

    def available(self) -> bool:
        return self._failures == 0 or time.monotonic() >= self._retry_at

    def succeeded(self) -> None:
        self._failures = 0

    def failed(self, error: BaseException) -> None:
        self._failures += 1
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        self.last_error = f"{type(error).__name__}: {error}"


class Tier(ABC):
    """Blocks of one shape and dtype under string keys.

    get(keys, out) fills out[i] (tensors of the block shape) for every hit and
    returns, per key, that tensor or None (out[i] of a miss may have been
    written to, e.g. by a corrupt object); without `out` it allocates.
    put returns how many blocks were written. `on_evict`, when set, receives
    evicted blocks before they are gone (write-back).
    """

    kind = "tier"
    bounded = False  # evicts when full (and so may hand blocks down in write-back)
    # A membership test costs this tier about what reading the block does (an
    # object store's HEAD is a request like its GET): the tiered store answers
    # a lookup by reading the blocks into the CPU tier, where the load finds them.
    lookup_reads = False

    def __init__(self, name: str, block_shape: Sequence[int], dtype: torch.dtype, health: Health | None = None) -> None:
        self.name = name
        self.block_shape = tuple(block_shape)
        self.dtype = dtype
        self.stats = TierStats()
        self.health = health or Health()
        self.on_evict: EvictionHook | None = None
        # on_change(what, keys), what "stored" or "removed": for KV events. Called
        # on whichever thread made the change, after its locks are released.
        self.on_change: Callable[[str, list[str]], None] | None = None
        self.kv_events = True  # publish this tier's changes when KV events are on (secondary tiers: opt in)
        self._logged_causes: set[str] = set()
        self.block_nbytes = torch.Size(self.block_shape).numel() * torch.empty((), dtype=dtype).element_size()

    @property
    def healthy(self) -> bool:
        return self.health.healthy

    def exists(self, keys: Sequence[str]) -> int:
        """Length of the prefix of `keys` this tier holds."""
        hits = self._guard(self._exists, 0, list(keys))
        self.stats.add(lookups=min(hits + 1, len(keys)), lookup_hits=hits)
        return hits

    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Per key, whether this tier holds it: one batched round trip."""
        keys = list(keys)
        if not keys:
            return []
        found = self._guard(self._contains, [False] * len(keys), keys)
        self.stats.add(lookups=len(keys), lookup_hits=sum(found))
        return found

    def get(self, keys: Sequence[str], out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        keys = list(keys)
        if out is None:
            out = [torch.empty(self.block_shape, dtype=self.dtype) for _ in keys]
        found = self._guard(self._get, [False] * len(keys), keys, out)
        hits = sum(found)
        self.stats.add(reads=len(keys), hits=hits, bytes_out=hits * self.block_nbytes)
        views = out.unbind(0) if isinstance(out, torch.Tensor) else out
        return [view if ok else None for view, ok in zip(views, found)]

    def put(self, keys: Sequence[str], tensors) -> int:
        """Store blocks (a [n, *block_shape] tensor or a list); how many were written."""
        return sum(self.store(keys, tensors))

    def store(self, keys: Sequence[str], tensors) -> list[bool]:
        """Like put, per block: True where it was written now (False: already
        held, no room, or the tier failed)."""
        keys = list(keys)
        self._check_blocks(keys, tensors)
        written = self._guard(self._store, None, keys, tensors)
        if written is None:  # down, or failed as a whole
            self.stats.add(dropped=len(keys))
            return [False] * len(keys)
        count = sum(written)
        self.stats.add(puts=count, bytes_in=count * self.block_nbytes)
        return written

    def _check_blocks(self, keys: list[str], tensors) -> None:
        if len(keys) != len(tensors):
            raise ValueError(f"{len(keys)} keys for {len(tensors)} blocks")
        shapes = [tuple(tensors.shape[1:])] if isinstance(tensors, torch.Tensor) else [tuple(t.shape) for t in tensors]
        dtypes = [tensors.dtype] if isinstance(tensors, torch.Tensor) else [t.dtype for t in tensors]
        if any(shape != self.block_shape for shape in shapes) or any(dtype != self.dtype for dtype in dtypes):
            raise ValueError(f"blocks must be {self.block_shape} {self.dtype}")

    def delete(self, keys: Sequence[str]) -> None:
        self._guard(self._delete, None, list(keys))

    def usage(self) -> dict:
        return {"kind": self.kind, "healthy": self.healthy, "last_error": self.health.last_error, **self._usage()}

    def close(self) -> None:
        """Release connections and threads."""

    def _changed(self, what: str, keys: list[str]) -> None:
        if keys and self.on_change is not None:
            try:
                self.on_change(what, keys)
            except Exception:  # an observer's bug is not the tier's failure
                logger.exception("tier %s: change listener failed", self.name)

    def _guard(self, operation, default, *args):
        if not self.health.available():
            return default
        try:
            result = operation(*args)
        except Exception as error:  # a tier failure is a miss, never the caller's problem
            self.health.failed(error)
            self.stats.add(errors=1)
            self._log_failure(operation.__name__, error)
            return default
        self.health.succeeded()
        return result

    def _log_failure(self, operation: str, error: BaseException) -> None:
        """A warning the first time a cause is seen, then debug: a tier that is
        down for an hour must not fill the log (every failure is counted)."""
        cause = f"{operation} failed: {error!r}"
        if cause in self._logged_causes:
            logger.debug("tier %s: %s", self.name, cause)
            return
        if len(self._logged_causes) < 256:
            self._logged_causes.add(cause)
        logger.warning("tier %s: %s (repeats are logged at debug level)", self.name, cause)

    @abstractmethod
    def _exists(self, keys: list[str]) -> int: ...

    def _contains(self, keys: list[str]) -> list[bool]:
        # Tiers with a cheaper batched membership test override this.
        return contains_by_prefix(self._exists, keys)

    @abstractmethod
    def _get(self, keys: list[str], out: Sequence[torch.Tensor]) -> list[bool]:
        """Fill out[i] for every hit. Nothing may write into `out` after this returns."""

    @abstractmethod
    def _store(self, keys: list[str], tensors) -> list[bool]:
        """Write the blocks not held yet; count those that find no room in stats.dropped."""

    @abstractmethod
    def _delete(self, keys: list[str]) -> None: ...

    @abstractmethod
    def _usage(self) -> dict: ...
