"""Loads in flight: from the store into staging buffers, then into the
request's device blocks, each reported exactly once.

A load lands on a store thread: what arrived is copied into the device pool
inside the load's fence, then the load is reported with the blocks that did
not arrive. A load past its deadline, or whose request ended, is given up on
the step thread: the fence is closed first (waiting for a copy already under
way), so no byte reaches the device pool after the report, and the blocks can
be freed at once. Its staging buffer goes back only when the store is done
with it, whenever that is.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import torch

from kvtier.kvstore.fence import WriteFence
from kvtier.kvstore.tiered_store import TieredStore

from ..staging import StagingBuffers
from .blocks import LoadPlan
from .transfer import DeviceCopier

logger = logging.getLogger("kvtier.connectors")


@dataclass
class InFlight:
    plan: LoadPlan
    deadline: float
    fence: WriteFence = field(default_factory=WriteFence)
    reported: bool = False
    placed: int = 0  # leading offload blocks copied straight from CPU-tier slots into the pool


class Loads:
    def __init__(self, store: TieredStore, staging: StagingBuffers, copier: DeviceCopier,
                 page_shape: tuple[int, ...], timeout_s: float, on_report: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.staging = staging
        self.copier = copier
        self.page_shape = page_shape
        self.timeout_s = timeout_s
        self._on_report = on_report  # a load's result is in: the step loop may take it
        self._lock = threading.Lock()
        self._in_flight: dict[str, InFlight] = {}
        self._results: dict[str, set[int]] = {}  # request -> device blocks that did not land

    def start(self, plan: LoadPlan, tiers: frozenset[str] | None) -> None:
        load = InFlight(plan, time.monotonic() + self.timeout_s)
        with self._lock:
            self._in_flight[plan.request_id] = load
        n = len(plan.keys)
        buffer = self.staging.acquire(n)
        # On the CPU the pool is host memory like the CPU tier: copy its hits straight
        # in (one copy of the KV, not two). On CUDA they go through pinned staging,
        # one DMA per load.
        place = None if self.copier.is_cuda else partial(self._place, load)
        try:
            future = self.store.get_async(plan.keys, buffer[:n], tiers, place=place)
        except BaseException:
            self.staging.release(buffer)
            self._report(load, 0)
            raise
        future.add_done_callback(lambda f: self._land(load, buffer, f))

    def _pages(self, load: InFlight, positions, blocks) -> tuple[list[int], list[int]]:
        """(device blocks, source pages) for offload blocks `positions`, whose data sit
        at offload-block rows `blocks` of the source."""
        rows = self.staging.rows_per_block
        dst, src = [], []
        for i, block in zip(positions, blocks):
            dst.extend(load.plan.dst_blocks[i])
            src.extend(block * rows + r for r in load.plan.src_rows[i])
        return dst, src

    def _place(self, load: InFlight, pool: torch.Tensor, positions: list[int], slots: list[int]) -> bool:
        """On a store thread: blocks in CPU-tier slots for the positions after the
        ones placed so far go straight into their device blocks, inside the load's
        fence like every other write. `_land` copies the rest from staging."""
        if list(positions) != list(range(load.placed, load.placed + len(positions))):
            return False
        with load.fence.writing() as allowed:
            if not allowed:
                return False
            dst, src = self._pages(load, positions, slots)
            self.copier.scatter(dst, pool.view(-1, *self.page_shape), src)
            load.placed += len(positions)
            return True

    def _land(self, load: InFlight, buffer: torch.Tensor, future: Future) -> None:
        """On a store thread, once the store has finished with `buffer`."""
        try:
            try:
                num_ok = future.result()
            except Exception:  # the store promises misses, not raises; be safe anyway
                logger.exception("offload load failed")
                num_ok = 0
            with load.fence.writing() as allowed:
                if not allowed:
                    return  # given up already: reported, and the blocks may be someone else's now
                try:
                    positions = range(load.placed, num_ok)
                    if positions:
                        dst, src = self._pages(load, positions, positions)
                        self.copier.scatter(dst, buffer.view(-1, *self.page_shape), src)
                except Exception:
                    logger.exception("copying loaded blocks into the device pool failed")
                    num_ok = 0
            self._report(load, num_ok)
        finally:
            self.staging.release(buffer)

    def _report(self, load: InFlight, num_ok: int) -> None:
        with self._lock:
            if load.reported:
                return
            load.reported = True
            if self._in_flight.get(load.plan.request_id) is load:
                del self._in_flight[load.plan.request_id]
            self._results[load.plan.request_id] = load.plan.failed_blocks(num_ok)
        self._on_report()

    def give_up(self, request_id: str) -> None:
        """Stop the request's load from touching the device pool; it is reported
        as failed (unless it landed first)."""
        with self._lock:
            load = self._in_flight.get(request_id)
        if load is not None:
            load.fence.close()  # waits for a copy into the pool already under way
            self._report(load, 0)

    def take_results(self) -> dict[str, set[int]]:
        """Loads ended since the last call (deadlines enforced first), in one swap."""
        now = time.monotonic()
        with self._lock:
            late = [rid for rid, load in self._in_flight.items() if load.deadline <= now]
        for rid in late:
            logger.warning("KV load for %s passed its %.1f s deadline: its tokens are recomputed",
                           rid, self.timeout_s)
            self.give_up(rid)
        with self._lock:
            results, self._results = self._results, {}
        return results

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)
