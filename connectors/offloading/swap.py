"""Preempted requests' KV, kept in the CPU tier until they resume.

swap_out (scheduler side) records which device blocks a victim gives up and
what they hold; nothing is copied yet. flush (worker side, first thing in
start_load_kv, so before any load or forward pass can write those blocks
again) makes every record safe with one batched gather for the whole step:
- a whole, fully computed offload block goes under its content key; found in
  the CPU tier already, it is only pinned, not copied;
- anything else (the partial last block, generated tokens not yet a whole
  offload block, an offload block a sliding group holds only part of) goes
  under a private key that no lookup asks for;
and every key is pinned against eviction. Pins are bounded (`max_pins`): a
new victim that would pass the bound makes the oldest records give theirs up
(those victims recompute), and one that alone passes it is declined.

swap_in builds a load over the kept keys into the victim's new blocks, and
only if they cover every real block it holds between start and end; the
pins go once the load holds its own. A victim that kept its prefix on device
and must give that up too (nothing else can make room) swaps it out into the
same record, which then covers both.
"""
from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from kvtier.kvstore.tiered_store import TieredStore

from ..staging import StagingBuffers
from .blocks import LoadPlan, OffloadBlocks
from .transfer import DeviceCopier

logger = logging.getLogger("kvtier.connectors")


@dataclass
class _Piece:
    """One offload block of one group that a victim gives up."""
    group: int
    j: int                      # offload block index
    rows: list[int]             # its rows (device blocks) that hold swapped KV
    src: list[int]              # device block of every row (0 where none is copied)
    content_key: str | None     # fully computed: the name every request knows it by
    whole: bool                 # every row is on device, so it can be copied under content_key
    key: str = ""               # where it is kept, decided at flush


@dataclass
class _Swapped:
    request_id: str
    start: int
    end: int
    pieces: list[_Piece]
    pinned: list[str] = field(default_factory=list)
    ready: bool = False  # flushed and every piece pinned
    loading: bool = False  # swap_in handed out its load


class SwapSpace:
    def __init__(self, store: TieredStore, blocks: OffloadBlocks, max_pins: int) -> None:
        self.store = store
        self.blocks = blocks
        self.max_pins = max_pins
        self._records: OrderedDict[str, _Swapped] = OrderedDict()  # oldest first
        self._unflushed: list[_Swapped] = []
        self._serial = itertools.count()
        self.num_pins = 0  # pieces of every record, flushed or not
        self.num_declined = 0
        self.num_dropped_for_room = 0

    # -- scheduler side ------------------------------------------------------
    def swap_out(self, request_id: str, block_hashes: list[bytes], tables: list[list[int]],
                 start: int, end: int) -> int:
        """Record [start, end) of the request's KV. A record it has already that
        starts at `end` (a victim that kept its prefix and must now give that up
        too) grows to cover both; any other is replaced."""
        kept = self._records.get(request_id)
        if kept is None or kept.start != end or kept.loading:
            self.drop(request_id)
            kept = None
        pieces = self._pieces(block_hashes, tables, start, end)
        if not pieces or len(pieces) > self.max_pins:
            self.num_declined += 1
            return 0
        while self.num_pins + len(pieces) > self.max_pins:
            oldest = next((rid for rid, rec in self._records.items() if rec.ready and rec is not kept), None)
            if oldest is None:
                self.num_declined += 1
                return 0
            self.drop(oldest)
            self.num_dropped_for_room += 1
        if kept is not None:  # its pieces are flushed and pinned already; the new ones are not
            kept.start, kept.pieces, kept.ready = start, pieces + kept.pieces, False
            self._records.move_to_end(request_id)
            record = kept
        else:
            record = _Swapped(request_id, start, end, pieces)
            self._records[request_id] = record
        self._unflushed.append(record)
        self.num_pins += len(pieces)
        return sum(len(p.rows) for p in pieces)

    def _pieces(self, hashes: list[bytes], tables: list[list[int]], start: int, end: int) -> list[_Piece]:
        b = self.blocks
        bs, per = b.layout.block_size, b.per_offload
        first, last = start // bs, -(-end // bs)
        pieces = []
        for j in range(first // per, -(-last // per)):
            for g in b.layout.groups:
                table = tables[g.index]
                lo = max(first, g.needed_from(end) // bs)  # a sliding group swaps only its window
                rows = [r for r in range(per) if lo <= j * per + r < min(last, len(table))
                        and table[j * per + r] != 0]
                if not rows:
                    continue
                computed = (j + 1) * per <= len(hashes) and (j + 1) * b.tokens <= end
                whole = computed and all(j * per + r < len(table) and table[j * per + r] != 0 for r in range(per))
                src = [table[j * per + r] if whole or r in rows else 0 for r in range(per)]
                pieces.append(_Piece(g.index, j, rows, src, b.key(g.index, hashes, j) if computed else None, whole))
        return pieces

    def swap_in(self, request_id: str, tables: list[list[int]], start: int, end: int) -> LoadPlan | None:
        """The load into the request's new blocks (its pins go once it started); None: recompute."""
        record = self._records.get(request_id)
        if record is None or not record.ready or (record.start, record.end) != (start, end):
            self.drop(request_id)
            return None
        bs, per = self.blocks.layout.block_size, self.blocks.per_offload
        plan, covered = LoadPlan(request_id), set()
        for p in record.pieces:
            table = tables[p.group]
            rows = [r for r in p.rows if start // bs <= p.j * per + r < len(table) and table[p.j * per + r] != 0]
            if rows:
                plan.keys.append(p.key)
                plan.dst_blocks.append([table[p.j * per + r] for r in rows])
                plan.src_rows.append(rows)
                covered.update((p.group, p.j * per + r) for r in rows)
        for g, table in enumerate(tables):
            for i in range(start // bs, min(-(-end // bs), len(table))):
                if table[i] != 0 and (g, i) not in covered:  # a page nothing would write: never
                    logger.warning("swapped KV of %s does not cover block %d of group %d: it recomputes",
                                   request_id, i, g)
                    self.drop(request_id)
                    return None
        record.loading = True
        return plan

    def started(self, request_id: str) -> None:
        """A load of the request started; a swap-in's holds its own pins now: give the record's up."""
        record = self._records.get(request_id)
        if record is not None and record.loading:
            self.drop(request_id)

    def drop(self, request_id: str) -> None:
        record = self._records.pop(request_id, None)
        if record is None:
            return
        if record in self._unflushed:
            self._unflushed.remove(record)
        self.store.cpu.release(record.pinned)
        self.num_pins -= len(record.pieces)

    def holds(self, request_id: str) -> bool:
        return request_id in self._records

    # -- worker side ----------------------------------------------------------
    def flush(self, copier: DeviceCopier, staging: StagingBuffers, page_shape: tuple[int, ...]) -> None:
        """Copy and pin what this step's victims gave up, before anything reuses their blocks."""
        records, self._unflushed = self._unflushed, []
        if not records:
            return
        cpu = self.store.cpu
        to_copy: list[tuple[_Swapped, _Piece]] = []
        for record in records:
            serial = next(self._serial)
            for p in record.pieces:
                if p.key:  # flushed with an earlier part of this record
                    continue
                if p.content_key is not None and cpu.acquire([p.content_key])[0] is not None:
                    p.key = p.content_key  # there already: pinned, nothing to copy
                    record.pinned.append(p.key)
                    continue
                # The piece's first row too: a record joined in the step its tail was
                # made holds two pieces of one (group, offload block), and the same key
                # for both served the tail's page as the prefix's (fuzz seed 30313).
                p.key = p.content_key if p.whole else self.blocks.private_key(
                    p.group, f"{record.request_id}/{serial}/{p.group}/{p.j}/{p.rows[0]}")
                to_copy.append((record, p))
        if to_copy:
            n = len(to_copy)
            buffer = staging.acquire(n)
            try:
                copied = copier.gather([b for _, p in to_copy for b in p.src], buffer[:n].view(-1, *page_shape))
                if copied is not None:
                    # CUDA: the victims' pages are read (the compute stream waits
                    # for that); the host copy must land before the CPU tier takes it.
                    copied.synchronize()
                keys = [p.key for _, p in to_copy]
                self.store.put_async(keys, buffer[:n], ("cpu",))  # into CPU-tier slots before it returns
            finally:
                staging.release(buffer)
            for (record, p), view in zip(to_copy, cpu.acquire(keys)):
                if view is not None:
                    record.pinned.append(p.key)
        for record in records:
            record.ready = len(record.pinned) == len(record.pieces)
            if not record.ready:  # the tier had no room for all of it: the victim recomputes
                self.drop(record.request_id)

    def stats(self) -> dict[str, int]:
        return {"swap_pins": self.num_pins, "swap_declined": self.num_declined,
                "swap_dropped_for_room": self.num_dropped_for_room}
