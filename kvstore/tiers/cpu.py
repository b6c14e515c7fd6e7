"""The CPU tier: a preallocated host pool of fixed-size block slots.

The pool is one tensor [num_slots, *block_shape], allocated and touched once
(pinned when CUDA is present). Blocks move in and out by batched row copies;
the lock is held only for bookkeeping, never during a copy: slots being
written are reserved, slots being read are pinned (acquired), and neither can
be evicted or reused until released.
"""
from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence

import torch

from ..buffers import advise_huge_pages, byte_rows, copy_rows, rows_of
from .base import Health, Tier
from .capacity import CapacityIndex


class CpuTier(Tier):
    kind = "cpu"
    bounded = True

    def __init__(self, name: str, block_shape: Sequence[int], dtype: torch.dtype, capacity_bytes: int,
                 policy, health: Health | None = None) -> None:
        super().__init__(name, block_shape, dtype, health)
        self.num_slots = capacity_bytes // self.block_nbytes
        pinned = torch.cuda.is_available()
        self.pool = torch.empty((self.num_slots, *self.block_shape), dtype=dtype, pin_memory=pinned)
        if not pinned:
            advise_huge_pages(self.pool)
        self._rows = byte_rows(self.pool)
        self._rows.fill(0)  # first touch now, not on the first request
        self._free = list(range(self.num_slots))  # a heap: lowest slots first, so batches land in runs
        self._slot_of: dict[str, int] = {}
        self._doomed: dict[str, int] = {}  # deleted while acquired: freed on release
        self._index = CapacityIndex(self.num_slots, policy)
        self._lock = threading.Lock()

    # -- the Tier interface ------------------------------------------------

    def _store(self, keys: list[str], blocks) -> list[bool]:
        slots = self.reserve(keys)
        fresh = [i for i, slot in enumerate(slots) if slot is not None]
        try:
            copy_rows(self._rows, [slots[i] for i in fresh], rows_of(blocks), fresh)
        except BaseException:
            self.settle(keys, slots, [False] * len(keys))
            raise
        self.settle(keys, slots, [True] * len(keys), keep_acquired=False)
        return [slot is not None for slot in slots]

    def _exists(self, keys: list[str]) -> int:
        with self._lock:
            return self._index.prefix(keys)

    def _contains(self, keys: list[str]) -> list[bool]:
        with self._lock:
            return [key in self._index for key in keys]

    def _get(self, keys: list[str], out) -> list[bool]:
        views = self.acquire(keys)
        held = [i for i, view in enumerate(views) if view is not None]
        try:
            self.read_acquired([keys[i] for i in held], out, held)
        finally:
            self.release([keys[i] for i in held])
        return [view is not None for view in views]

    def _delete(self, keys: list[str]) -> None:
        gone = []
        with self._lock:
            for key in keys:
                if self._index.remove(key):
                    gone.append(key)
                    slot = self._slot_of.pop(key)
                    if self._index.is_pinned(key):
                        self._doomed[key] = slot
                        self._index.capacity -= 1  # the slot is still taken until released
                    else:
                        heapq.heappush(self._free, slot)
        self._changed("removed", gone)

    def _usage(self) -> dict:
        with self._lock:
            return {
                "blocks": len(self._index),
                "used_bytes": len(self._index) * self.block_nbytes,
                "capacity_bytes": self.num_slots * self.block_nbytes,
                "pinned": self._index.pinned,
                "free_slots": len(self._free),
            }

    # -- what the tiered store uses beside the Tier interface --------------

    def reserve(self, keys: Sequence[str]) -> list[int | None]:
        """A slot for each key not held yet (None: held, or twice in `keys`, or no
        room), evicting for it. Until settle() the slot is the caller's to fill:
        nobody reads it, nobody else is given it."""
        slots: list[int | None] = [None] * len(keys)
        spare, victims, dropped = [], [], 0
        with self._lock:
            for i, key in enumerate(keys):
                if self._index.known(key):  # held, being written, or twice in this batch
                    self._index.touch(key)
                    continue
                reserved, evicted = self._index.reserve(key, 1)
                for victim in evicted:
                    slot = self._slot_of.pop(victim)
                    victims.append((victim, slot))
                    spare.append(slot)
                if not reserved:
                    dropped += 1
                    continue
                slots[i] = spare.pop() if spare else heapq.heappop(self._free)
        try:
            if victims and self.on_evict is not None:
                # The victims' slots belong to this call now: copy them out before they are reused.
                self._hand_down(victims)
        except BaseException:
            self.settle(keys, slots, [False] * len(keys))
            raise
        finally:
            with self._lock:
                for slot in spare:
                    heapq.heappush(self._free, slot)
        self.stats.add(evictions=len(victims), dropped=dropped)
        self._changed("removed", [key for key, _ in victims])
        return slots

    def settle(self, keys: Sequence[str], slots: Sequence[int | None], filled: Sequence[bool],
               keep_acquired: bool = True) -> None:
        """End a reserve(): a slot whose block was filled whole becomes the key's
        (acquired, when `keep_acquired`: release() it after reading), the others
        are given back."""
        kept = []
        with self._lock:
            for key, slot, ok in zip(keys, slots, filled):
                if slot is None:
                    continue
                if ok:
                    self._slot_of[key] = slot
                    self._index.commit(key)
                    if keep_acquired:
                        self._index.pin(key)
                    kept.append(key)
                else:
                    self._index.release(key)
                    heapq.heappush(self._free, slot)
        self._changed("stored", kept)

    def acquire(self, keys: Sequence[str], lookup: bool = False) -> list[torch.Tensor | None]:
        """Pin each held key and return a view of its slot (None if not held).
        A view stays valid until release(); release exactly the acquired keys."""
        views = []
        with self._lock:
            for key in keys:
                if key in self._index:
                    self._index.pin(key)
                    self._index.touch(key)
                    views.append(self.pool[self._slot_of[key]])
                else:
                    views.append(None)
        if lookup:
            hits = sum(view is not None for view in views)
            self.stats.add(reads=len(keys), hits=hits, bytes_out=hits * self.block_nbytes)
        return views

    def release(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._index.unpin(key)
                if key in self._doomed and not self._index.is_pinned(key):
                    heapq.heappush(self._free, self._doomed.pop(key))
                    self._index.capacity += 1

    def slots_of(self, keys: Sequence[str]) -> list[int]:
        """The slots (rows of `pool`) of acquired keys; valid until they are released."""
        with self._lock:
            return [self._slot_of.get(key, self._doomed.get(key)) for key in keys]

    def read_acquired(self, keys: Sequence[str], out, out_rows: Sequence[int]) -> None:
        """Copy acquired keys into out[out_rows[i]] in batched runs."""
        if keys:
            copy_rows(rows_of(out), out_rows, self._rows, self.slots_of(keys))

    def _hand_down(self, victims: list[tuple[str, int]]) -> None:
        copies = torch.empty((len(victims), *self.block_shape), dtype=self.dtype)
        copy_rows(byte_rows(copies), range(len(victims)), self._rows, [slot for _, slot in victims])
        self.on_evict([key for key, _ in victims], list(copies))
