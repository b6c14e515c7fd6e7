"""TieredStore: the CPU tier, then secondary tiers, as one block store.

Writes cascade down: write-through (every allowed tier, in the background) or
write-back (a block goes down only when the tier above evicts it). Reads go up:
a hit in a lower tier is copied into the caller's buffer and promoted into the
CPU tier. A prefix lookup stops at the first key no allowed tier holds.

Threads: put_async copies blocks into the CPU pool on the caller's thread (a
memcpy; the caller may reuse its buffer as soon as the call returns); the
secondary writes run on each tier's worker threads, reading straight from the
pinned CPU slots. get_async pins the CPU hits at once, then copies on the CPU
tier's workers and walks the secondary tiers on theirs. No tier failure ever
raises to the caller: it is a miss, or a dropped store, and is counted.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from functools import partial

import torch

from kvtier.policies import cache_policy_factory, make_cache_policy

from .block_format import BlockCodec
from .tiers import CpuTier, Tier, TierContext, parse_tier_spec
from .workers import LOAD, STORE, TierWorker

logger = logging.getLogger(__name__)

WRITE_MODES = ("write_through", "write_back")
# A tier whose lookups read (Tier.lookup_reads) is read this many blocks at a time.
LOOKUP_READ_WAVE = 32
# place(cpu_pool, positions, slots) -> bool: see get_async.
Place = Callable[[torch.Tensor, list[int], list[int]], bool]


class _Countdown:
    """Runs `done` once, on the last of `count` ticks."""

    def __init__(self, count: int, done) -> None:
        self._count = count
        self._done = done
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self._count -= 1
            last = self._count == 0
        if last:
            self._done()


class _Load:
    """One get_async in flight: which positions of `out` are filled so far."""

    def __init__(self, keys: list[str], out: torch.Tensor, below: list[Tier], promote: bool, priority: int) -> None:
        self.keys = keys
        self.out = out
        self.below = below
        self.promote = promote
        self.priority = priority
        self.filled = [False] * len(keys)
        self.placed = 0  # positions 0..placed-1 went to `place`, not into `out`
        self.future: Future = Future()

    def missing(self) -> list[int]:
        return [i for i, done in enumerate(self.filled) if not done]

    def finish(self) -> None:
        if not self.future.done():
            leading = next((i for i, done in enumerate(self.filled) if not done), len(self.filled))
            self.future.set_result(leading)


class TieredStore:
    def __init__(self, block_shape: Sequence[int], dtype: torch.dtype, cpu_bytes: int,
                 secondary_specs: Iterable[dict] = (), model_fingerprint: str = "",
                 eviction_policy: str = "lru", write_mode: str = "write_through", *,
                 cache_policy_module_path: str | None = None, block_tokens: int = 0,
                 cpu_workers: int = 2, queue_depth: int = 256) -> None:
        if write_mode not in WRITE_MODES:
            raise ValueError(f"write_mode must be one of {WRITE_MODES}, not {write_mode!r}")
        self.block_shape = tuple(block_shape)
        self.dtype = dtype
        self.write_mode = write_mode
        self.codec = BlockCodec(model_fingerprint, dtype, self.block_shape, block_tokens)
        default_policy = cache_policy_factory(eviction_policy, cache_policy_module_path)
        context = TierContext(self.codec, lambda name: default_policy() if name is None else make_cache_policy(name))
        specs = [parse_tier_spec(spec) for spec in secondary_specs]  # all validated before anything starts

        self.cpu = CpuTier("cpu", self.block_shape, dtype, cpu_bytes, default_policy())
        self.tiers: dict[str, Tier] = {"cpu": self.cpu}
        self._workers: dict[str, TierWorker] = {"cpu": TierWorker("cpu", cpu_workers, queue_depth)}
        try:
            for spec in specs:
                name = self._name_for(spec)
                tier = spec.build(context)
                tier.name = name
                tier.kv_events = spec.enable_kv_events
                self.tiers[name] = tier
                self._workers[name] = TierWorker(name, spec.workers, spec.queue_depth)
        except BaseException:
            self.close()
            raise
        # listener(tier name, tier kind, "stored" | "removed", keys): KV events.
        self.listener = None
        for name, tier in self.tiers.items():
            tier.on_change = partial(self._tier_changed, name, tier.kind)
        # write-back: (tier holding a block, key) -> the allowed tiers below it still to write
        self._below: dict[tuple[str, str], tuple[str, ...]] = {}
        self._below_lock = threading.Lock()
        if write_mode == "write_back":
            for name, tier in self.tiers.items():
                tier.on_evict = partial(self._hand_down, name)

    def _tier_changed(self, name: str, kind: str, what: str, keys: list[str]) -> None:
        if self.listener is not None:
            self.listener(name, kind, what, keys)

    def _name_for(self, spec) -> str:
        if spec.name:
            if spec.name in self.tiers:
                raise ValueError(f"two tiers are named {spec.name!r}")
            return spec.name
        name, n = spec.type, 2
        while name in self.tiers:
            name, n = f"{spec.type}{n}", n + 1
        return name

    def _allowed(self, tiers: Iterable[str] | None) -> list[str]:
        if tiers is None:
            return list(self.tiers)
        tiers = set(tiers)
        return [name for name in self.tiers if name in tiers]

    # -- lookups -----------------------------------------------------------

    def lookup(self, keys: Sequence[str], tiers: Iterable[str] | None = None) -> int:
        """How many leading keys some allowed tier holds (stops at the first gap)."""
        keys = list(keys)
        allowed = [self.tiers[name] for name in self._allowed(tiers)]
        found = 0
        while found < len(keys):
            for tier in allowed:
                hits = tier.exists(keys[found:])
                if hits:
                    found += hits
                    break
            else:
                break
        return found

    def contains(self, keys: Sequence[str], tiers: Iterable[str] | None = None) -> list[bool]:
        """Per key, whether some allowed tier holds it: one batched call per
        tier, each asked only for what the tiers above it lack. A tier whose
        lookups read (Tier.lookup_reads) is read into the CPU tier instead,
        when that is allowed: keys are expected in prefix order."""
        keys = list(keys)
        allowed = self._allowed(tiers)
        found = [False] * len(keys)
        for name in allowed:
            missing = [i for i, hit in enumerate(found) if not hit]
            if not missing:
                break
            tier, asked = self.tiers[name], [keys[i] for i in missing]
            reading = tier.lookup_reads and "cpu" in allowed
            for i, hit in zip(missing, self._read_for_lookup(tier, asked) if reading else tier.contains(asked)):
                found[i] = hit
        return found

    def _read_for_lookup(self, tier: Tier, keys: list[str]) -> list[bool]:
        """Presence from reading the blocks into fresh CPU-tier slots (verified,
        as every read is), a wave at a time. What follows a wave with a miss is
        only asked about (past a gap in a prefix, at most one wave is read for
        nothing), and so is what goes past half the CPU tier (reads that would
        evict each other before the load help nobody)."""
        found = [False] * len(keys)
        readable, end = min(len(keys), self.cpu.num_slots // 2), 0
        while end < readable:
            wave = keys[end:min(end + LOOKUP_READ_WAVE, readable)]
            slots = self.cpu.reserve(wave)
            reading = [j for j, slot in enumerate(slots) if slot is not None]
            try:
                got = tier.get([wave[j] for j in reading], [self.cpu.pool[slots[j]] for j in reading]) if reading else []
            except BaseException:
                self.cpu.settle(wave, slots, [False] * len(wave))
                raise
            hits = [False] * len(wave)
            for j, block in zip(reading, got):
                hits[j] = block is not None
            self.cpu.settle(wave, slots, hits, keep_acquired=False)
            tier.stats.add(lookups=len(reading), lookup_hits=sum(hits))
            # No slot: the CPU tier came to hold it meanwhile (or it was asked twice), or had no room.
            unslotted = [j for j, slot in enumerate(slots) if slot is None]
            if unslotted:
                there = self.cpu.contains([wave[j] for j in unslotted])
                ask = [j for j, hit in zip(unslotted, there) if not hit]
                for j in unslotted:
                    hits[j] = True
                for j, hit in zip(ask, tier.contains([wave[j] for j in ask]) if ask else []):
                    hits[j] = hit
            found[end:end + len(wave)] = hits
            end += len(wave)
            if not all(hits[j] for j in reading):
                break
        if end < len(keys):
            found[end:] = tier.contains(keys[end:])
        return found

    @property
    def secondary_tiers(self) -> list[str]:
        return [name for name in self.tiers if name != "cpu"]

    # -- stores ------------------------------------------------------------

    def put_async(self, keys: Sequence[str], blocks: torch.Tensor, tiers: Iterable[str] | None = None,
                  priority: int = 0) -> Future:
        """Store blocks [n, *block_shape]. The future's result: blocks written, per tier.
        `blocks` is copied (into CPU-tier slots, or cloned) before this returns:
        the caller may reuse its memory at once."""
        keys = list(keys)
        self._check(blocks, len(keys), "blocks")
        allowed = self._allowed(tiers)
        below = [name for name in allowed if name != "cpu"]
        future: Future = Future()
        written: dict[str, int] = {}
        views: list[torch.Tensor | None] = [None] * len(keys)
        down = list(range(len(keys)))
        if "cpu" in allowed:
            fresh = self.cpu.store(keys, blocks)
            written["cpu"] = sum(fresh)
            views = self.cpu.acquire(keys)
            # Down go the blocks just copied in (from their pinned slot) and those
            # the pool had no room for; blocks it held already went down before.
            down = [i for i in range(len(keys)) if fresh[i] or views[i] is None]
            if self.write_mode == "write_back":
                self._remember_below("cpu", [keys[i] for i in down if views[i] is not None], below)
                down = [i for i in down if views[i] is None]
            self.cpu.release([keys[i] for i in range(len(keys)) if views[i] is not None and i not in down])
        targets = below[:1] if self.write_mode == "write_back" else below
        if not down or not targets:
            self.cpu.release([keys[i] for i in down if views[i] is not None])
            future.set_result(written)
            return future
        if self.write_mode == "write_back":
            self._remember_below(targets[0], [keys[i] for i in down], below[1:])
        pinned = [keys[i] for i in down if views[i] is not None]
        down_keys = [keys[i] for i in down]
        down_blocks = [views[i] if views[i] is not None else blocks[i].clone() for i in down]

        def done() -> None:
            self.cpu.release(pinned)
            future.set_result(written)

        countdown = _Countdown(len(targets), done)
        for name in targets:
            self._submit_store(name, down_keys, down_blocks, priority, written, countdown)
        return future

    def _submit_store(self, name: str, keys: list[str], blocks: list[torch.Tensor], priority: int,
                      written: dict[str, int], countdown: _Countdown | None = None) -> None:
        """Queue a store on the tier's workers; a full queue drops it (counted)."""
        tier = self.tiers[name]
        tick = countdown.tick if countdown else lambda: None

        def job() -> None:
            try:
                written[name] = sum(tier.store(keys, blocks))
            finally:
                tick()

        if not self._workers[name].submit(job, STORE, priority):
            tier.stats.add(dropped=len(keys))
            written[name] = 0
            tick()

    def _remember_below(self, holder: str, keys: list[str], below: list[str]) -> None:
        if below and keys and self.tiers[holder].bounded:
            with self._below_lock:
                for key in keys:
                    self._below[(holder, key)] = tuple(below)

    def _hand_down(self, holder: str, keys: list[str], blocks: list[torch.Tensor]) -> None:
        """Write-back: `holder` evicted these blocks; write them one tier down."""
        groups: dict[str, list[int]] = {}
        with self._below_lock:
            for i, key in enumerate(keys):
                below = self._below.pop((holder, key), None)
                if below:
                    groups.setdefault(below[0], []).append(i)
                    if len(below) > 1 and self.tiers[below[0]].bounded:
                        self._below[(below[0], key)] = below[1:]
        for name, positions in groups.items():
            self._submit_store(name, [keys[i] for i in positions], [blocks[i] for i in positions], 0, {})

    # -- loads -------------------------------------------------------------

    def get_async(self, keys: Sequence[str], out: torch.Tensor, tiers: Iterable[str] | None = None,
                  priority: int = 0, place: Place | None = None) -> Future:
        """Fill out[i] for the leading keys found; the future's result is how many.
        Secondary hits are promoted into the CPU tier (when it is allowed): they
        are read straight into its slots, and copied from there.

        `place(pool, positions, slots)`, if given, is offered every run of blocks
        sitting in CPU-tier slots that continues the positions placed so far
        (0..k-1 first, then the secondary hits after them), on a store thread
        while the slots are held: pool[slots[j]] is the block for position
        positions[j]. It copies them straight where they are going (one copy, not
        two through `out`) and returns True; False sends them through `out`."""
        keys = list(keys)
        self._check(out, len(keys), "out", at_least=True)
        allowed = self._allowed(tiers)
        load = _Load(keys, out, [self.tiers[name] for name in allowed if name != "cpu"], "cpu" in allowed, priority)
        if not keys:
            load.finish()
            return load.future
        views = self.cpu.acquire(keys, lookup=True) if load.promote else [None] * len(keys)
        held = [i for i, view in enumerate(views) if view is not None]
        if not held:
            self._next_stage(load, 0, place)
            return load.future

        def copy_from_cpu() -> None:
            self._hand_over(load, held, place)
            self._next_stage(load, 0, place)

        if not self._workers["cpu"].submit(partial(self._guarded_stage, load, copy_from_cpu), LOAD, priority):
            self.cpu.release([keys[i] for i in held])
            load.finish()
        return load.future

    def _hand_over(self, load: _Load, held: list[int], place: Place | None) -> None:
        """Positions `held` sit in acquired CPU-tier slots: the run continuing the
        placed ones goes to `place`, the rest is copied into `out`; then released."""
        held_keys = [load.keys[i] for i in held]
        try:
            through_out = held
            lead = next((j for j, i in enumerate(held) if i != load.placed + j), len(held))
            if place is not None and lead and place(self.cpu.pool, held[:lead], self.cpu.slots_of(held_keys[:lead])):
                load.placed += lead
                through_out = held[lead:]
            self.cpu.read_acquired([load.keys[i] for i in through_out], load.out, through_out)
            for i in held:
                load.filled[i] = True
        finally:
            self.cpu.release(held_keys)

    def _next_stage(self, load: _Load, level: int, place: Place | None = None) -> None:
        missing = load.missing()
        if not missing or level >= len(load.below):
            load.finish()
            return
        tier = load.below[level]

        def stage() -> None:
            keys = [load.keys[i] for i in missing]
            # Promotion without a copy of its own: a block with a fresh CPU slot is read into it.
            slots = self.cpu.reserve(keys) if load.promote else [None] * len(keys)
            try:
                got = tier.get(keys, [load.out[i] if slot is None else self.cpu.pool[slot]
                                      for i, slot in zip(missing, slots)])
            except BaseException:
                self.cpu.settle(keys, slots, [False] * len(keys))
                raise
            found = [block is not None for block in got]
            self.cpu.settle(keys, slots, found)  # tier.get wrote its last byte before it returned
            for i, slot, ok in zip(missing, slots, found):
                if ok and slot is None:
                    load.filled[i] = True
            self._hand_over(load, [i for i, slot, ok in zip(missing, slots, found) if ok and slot is not None], place)
            self._next_stage(load, level + 1, place)

        if not self._workers[tier.name].submit(partial(self._guarded_stage, load, stage), LOAD, load.priority):
            load.finish()

    @staticmethod
    def _guarded_stage(load: _Load, stage) -> None:
        try:
            stage()
        except Exception:  # a bug, not a tier failure (tiers never raise): still answer the caller
            logger.exception("load stage failed")
            load.finish()

    # -- the rest ----------------------------------------------------------

    def delete(self, keys: Sequence[str], tiers: Iterable[str] | None = None) -> None:
        for name in self._allowed(tiers):
            self.tiers[name].delete(keys)

    def stats(self) -> dict[str, dict]:
        return {
            name: {**tier.stats.snapshot(), **tier.usage(), **self._workers[name].queued}
            for name, tier in self.tiers.items() if name in self._workers
        }

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued load and store (hand-downs included) is done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for worker in self._workers.values():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not worker.wait_idle(left):
                    return False
            # A finished job may have queued more on another tier (promotion, hand-down).
            if not any(any(worker.queued.values()) for worker in self._workers.values()):
                return True

    def close(self) -> None:
        """Finish queued work, then release every tier."""
        for worker in getattr(self, "_workers", {}).values():
            worker.close()
        for tier in getattr(self, "tiers", {}).values():
            tier.close()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, blocks: torch.Tensor, n: int, what: str, at_least: bool = False) -> None:
        count_ok = blocks.shape[0] >= n if at_least else blocks.shape[0] == n
        if not count_ok or tuple(blocks.shape[1:]) != self.block_shape or blocks.dtype != self.dtype:
            raise ValueError(f"{what} is {tuple(blocks.shape)} {blocks.dtype}; "
                             f"expected [{n}, *{self.block_shape}] {self.dtype}")
        if not blocks.is_contiguous() or blocks.device.type != "cpu":
            raise ValueError(f"{what} must be a contiguous CPU tensor")
