"""OffloadingConnector: the device pool's blocks saved to, and loaded from, a
TieredStore (a host-memory CPU tier, then any secondary tiers).

Scheduler side: lookups (answered at once from the CPU tier, else off the
step loop), load plans read off the request's block tables, save plans for
the blocks each step completed. Worker side: loads start on the store's
threads and land in the device pool on their own (the request waits,
WAITING_FOR_REMOTE_KVS, while others run); saves gather the step's new
offload blocks with one batched copy and hand them to the store, which
writes them down its tiers in the background.
"""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvtier.policies.registry import make_request_policy
from kvtier.policies.request_policy import RequestDecision, RequestInfo

from .. import kv_events
from ..base import ConnectorMetadata, ConnectorRequest, FinishedTransfers, KVConnectorBase, KVLayout, StepPlan
from ..config import KVTransferConfig
from ..staging import StagingBuffers
from .blocks import LoadPlan, OffloadBlocks
from .config import OffloadingConfig, parse_offloading_config
from .loads import Loads
from .lookups import Lookups
from .specs import make_spec
from .swap import SwapSpace
from .transfer import DeviceCopier

logger = logging.getLogger("kvtier.connectors")


@dataclass
class SavePlan:
    keys: list[str] = field(default_factory=list)
    src_blocks: list[list[int]] = field(default_factory=list)  # device blocks of each offload block
    write_tiers: frozenset[str] | None = None


@dataclass
class OffloadingMetadata(ConnectorMetadata):
    loads: list[tuple[LoadPlan, frozenset[str] | None]]
    saves: list[SavePlan]


class BoundedCounter:
    """How often each offload block was asked for (for store_threshold), bounded."""

    def __init__(self, capacity: int = 1 << 17):
        self.capacity = capacity
        self.counts: OrderedDict[bytes, int] = OrderedDict()

    def bump(self, key: bytes) -> int:
        n = self.counts.pop(key, 0) + 1
        self.counts[key] = n
        if len(self.counts) > self.capacity:
            self.counts.popitem(last=False)
        return n

    def get(self, key: bytes) -> int:
        return self.counts.get(key, 0)


class OffloadingConnector(KVConnectorBase):
    @classmethod
    def validate_config(cls, config: KVTransferConfig) -> None:
        parse_offloading_config(dict(config.kv_connector_extra_config))

    def __init__(self, config: KVTransferConfig, layout: KVLayout):
        super().__init__(config, layout)
        self.cfg: OffloadingConfig = parse_offloading_config(self.extra)
        self.blocks = OffloadBlocks(layout, self.cfg.offload_tokens(layout.block_size), self.cfg.namespace)
        self.offload_tokens = self.blocks.tokens
        self.block_shape = self.blocks.shape
        block_bytes = torch.Size(self.block_shape).numel() * torch.empty((), dtype=layout.dtype).element_size()
        cpu_bytes = self.cfg.num_cpu_blocks * block_bytes if self.cfg.num_cpu_blocks else self.cfg.cpu_bytes_to_use
        self.store = make_spec(self.cfg).build_store(self.block_shape, layout.dtype, cpu_bytes,
                                                     layout.model_fingerprint, self.offload_tokens)
        self.request_policy = make_request_policy(self.cfg.request_policy, self.cfg.request_policy_module_path,
                                                  **self.cfg.request_policy_config)
        self.lookups = Lookups(self.store, self.cfg.load_timeout_s, on_answer=self._signal_progress)
        self.swap = SwapSpace(self.store, self.blocks, int(self.store.cpu.num_slots * self.cfg.swap_space_fraction))
        self.seen = BoundedCounter(self.cfg.max_tracker_size)
        # Per request, dropped in request_finished however the request ends.
        self.decisions: dict[str, RequestDecision] = {}
        self.saved_upto: dict[str, int] = {}  # offload blocks of a request already in the store
        self.can_load = config.kv_role in ("kv_both", "kv_consumer")
        self.can_save = config.kv_role in ("kv_both", "kv_producer")
        self._pending_loads: list[tuple[LoadPlan, frozenset[str] | None]] = []
        self._loads: Loads | None = None  # needs the device pool: made in register_kv_caches
        self._closed = False
        self.lookup_tokens = 0
        # Finish queued stores before the interpreter tears down their threads;
        # a weak reference, so that a dropped engine's memory can still go.
        ref = weakref.ref(self)
        atexit.register(lambda: ref() and ref().shutdown())

    def register_kv_caches(self, kv_cache: torch.Tensor) -> None:
        super().register_kv_caches(kv_cache)
        self._copier = DeviceCopier(kv_cache)
        self._staging = StagingBuffers(self.block_shape, self.layout.dtype, pin=kv_cache.is_cuda)
        self._loads = Loads(self.store, self._staging, self._copier, self.layout.page_shape, self.cfg.load_timeout_s,
                            on_report=self._signal_progress)
        if kv_cache.is_cuda:  # hands saves to the store once their copy to the host is done
            self._saver = ThreadPoolExecutor(1, thread_name_prefix="kv-save")

    def _decision(self, request: ConnectorRequest) -> RequestDecision:
        d = self.decisions.get(request.request_id)
        if d is None:
            info = RequestInfo(request.request_id, request.num_prompt_tokens, request.cache_salt,
                               getattr(request, "priority", 0))
            d = self.decisions[request.request_id] = self.request_policy.on_new_request(info)
            # First sight of the request: count its prompt's offload blocks for store_threshold.
            for j in range(request.num_prompt_tokens // self.offload_tokens):
                self.seen.bump(self.blocks.last_hash(request.block_hashes, j))
        return d

    # -- scheduler side ----------------------------------------------------
    def get_num_new_matched_tokens(self, request: ConnectorRequest,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        decision = self._decision(request)
        rid = request.request_id
        # Every whole offload block of the prompt may hit, the one holding the last
        # prompt token too: the scheduler then recomputes only that token.
        n_prompt = request.num_prompt_tokens
        end = n_prompt // self.offload_tokens
        start = num_computed_tokens // self.offload_tokens
        self.saved_upto[rid] = max(start, self.saved_upto.get(rid, 0))
        if not self.can_load or end <= start:
            return 0, False
        hashes, tiers = request.block_hashes, decision.read_tiers
        keys = self.blocks.keys_to_check(hashes, start, end)
        hit = self.blocks.longest_hit(hashes, start, end, n_prompt, self.lookups.cpu_presence(keys, tiers))
        if hit < end and self.lookups.has_secondary(tiers):
            present = self.lookups.answer(rid, keys, tiers)
            if present is None:
                return None, False  # ask again next step
            self.lookups.forget(rid)
            hit = self.blocks.longest_hit(hashes, start, end, n_prompt, present)
        self.lookup_tokens += end * self.offload_tokens - num_computed_tokens
        tokens = self.blocks.boundary(hit, n_prompt) - num_computed_tokens if hit > start else 0
        return max(0, tokens), tokens > 0

    def update_state_after_alloc(self, request: ConnectorRequest, block_ids: list[list[int]],
                                 num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        computed = request.num_computed_tokens
        boundary = computed + num_external_tokens
        plan = self.blocks.load_plan(request.request_id, request.block_hashes, block_ids, computed, boundary)
        # The last offload block may hold tokens still to compute; it was loaded whole, so no need to save it.
        self.saved_upto[request.request_id] = -(-boundary // self.offload_tokens)
        self._pending_loads.append((plan, self._decision(request).read_tiers))

    def build_connector_meta(self, plan: StepPlan) -> OffloadingMetadata:
        loads, self._pending_loads = self._pending_loads, []
        saves = self._plan_saves(plan) if self.can_save else []
        return OffloadingMetadata(loads, saves)

    def _plan_saves(self, plan: StepPlan) -> list[SavePlan]:
        saves = []
        for s in plan.scheduled:
            req = s.request
            decision = self._decision(req)
            if not decision.store:
                continue
            done = s.num_computed_tokens + s.num_new_tokens  # KV computed once this step has run
            if self.cfg.offload_prompt_only:
                done = min(done, req.num_prompt_tokens)
            first = self.saved_upto.get(req.request_id, 0)
            last = min(done // self.offload_tokens, len(req.block_hashes) // self.blocks.per_offload)
            if last <= first:
                continue
            self.saved_upto[req.request_id] = last
            save = SavePlan(write_tiers=decision.write_tiers)
            for j in range(first, last):
                if self.seen.get(self.blocks.last_hash(req.block_hashes, j)) < self.cfg.store_threshold:
                    continue
                for g in self.layout.groups:
                    blocks = self.blocks.saveable(s.block_ids[g.index], j)
                    if blocks is not None:
                        key = self.blocks.key(g.index, req.block_hashes, j)
                        save.keys.append(key)
                        save.src_blocks.append(blocks)
                        self._note_key(key, g.index, req.block_hashes, j, req.all_token_ids)
            if save.keys:
                saves.append(save)
        return saves

    def request_priority(self, request: ConnectorRequest) -> int | None:
        return self._decision(request).priority

    def _signal_progress(self) -> None:
        self.progress.set()  # looked up at each call: a MultiConnector shares its own event

    # -- preemption by swapping ----------------------------------------------
    @property
    def can_swap(self) -> bool:
        return True  # the CPU tier is always there

    def swap_out(self, request: ConnectorRequest, block_ids: list[list[int]], start: int, end: int) -> int:
        return self.swap.swap_out(request.request_id, request.block_hashes, block_ids, start, end)

    def swap_in(self, request: ConnectorRequest, block_ids: list[list[int]], start: int, end: int) -> int:
        plan = self.swap.swap_in(request.request_id, block_ids, start, end)
        if plan is None:
            return 0
        read = self._decision(request).read_tiers
        # Content-keyed blocks may be read from lower tiers too if the CPU tier lost them.
        self._pending_loads.append((plan, None if read is None else read | {"cpu"}))
        return sum(len(blocks) for blocks in plan.dst_blocks)

    def drop_swap(self, request: ConnectorRequest) -> None:
        self.swap.drop(request.request_id)

    def request_finished(self, request: ConnectorRequest, block_ids: list[list[int]]) -> bool:
        rid = request.request_id
        self.swap.drop(rid)
        self.decisions.pop(rid, None)
        self.saved_upto.pop(rid, None)
        self.lookups.forget(rid)
        self._pending_loads = [(plan, tiers) for plan, tiers in self._pending_loads if plan.request_id != rid]
        if self._loads is not None:
            self._loads.give_up(rid)  # reported as ended at the next take_finished
        return False

    # -- worker side -------------------------------------------------------
    def start_load_kv(self, metadata: OffloadingMetadata) -> None:
        # Victims' blocks first: this step's loads and forward pass may reuse them.
        self.swap.flush(self._copier, self._staging, self.layout.page_shape)
        for plan, tiers in metadata.loads:
            self._loads.start(plan, tiers)
            self.swap.started(plan.request_id)  # a swap-in's load holds its own pins now

    def wait_for_save(self, metadata: OffloadingMetadata) -> None:
        for save in metadata.saves:
            buffer = self._staging.acquire(len(save.keys))
            try:
                # One batched gather: the device blocks are free to be reused once it is done.
                copied = self._copier.gather([b for blocks in save.src_blocks for b in blocks],
                                             buffer[:len(save.keys)].view(-1, *self.layout.page_shape))
            except BaseException:
                self._staging.release(buffer)
                raise
            if copied is None:
                self._store(save, buffer)
            else:  # CUDA: the copy to the host is still under way; the step goes on
                self._saver.submit(self._store, save, buffer, copied)

    def _store(self, save: SavePlan, buffer: torch.Tensor, copied=None) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            # put_async copies what it keeps before it returns (into CPU-tier
            # slots, or clones), so the buffer is free again right after.
            self.store.put_async(save.keys, buffer[:len(save.keys)], save.write_tiers)
        finally:
            self._staging.release(buffer)

    def take_finished(self, finished_req_ids: set[str]) -> FinishedTransfers:
        loaded = self._loads.take_results() if self._loads is not None else {}
        return FinishedTransfers(loaded=loaded)

    # -- KV events ------------------------------------------------------------
    def enable_kv_events(self) -> None:
        self._events: list | None = []
        self._events_lock = threading.Lock()
        self._key_info: OrderedDict[str, tuple] = OrderedDict()  # key -> what its events say, bounded
        self.store.listener = self._tier_changed

    def _note_key(self, key: str, group: int, hashes: list[bytes], j: int, token_ids: list[int]) -> None:
        if getattr(self, "_events", None) is None:
            return
        per = self.blocks.per_offload
        info = (group, hashes[j * per:(j + 1) * per], hashes[j * per - 1] if j else None,
                token_ids[j * self.offload_tokens:(j + 1) * self.offload_tokens])
        with self._events_lock:
            self._key_info[key] = info
            self._key_info.move_to_end(key)
            while len(self._key_info) > self.cfg.max_tracker_size:
                self._key_info.popitem(last=False)

    def _tier_changed(self, name: str, kind: str, what: str, keys: list[str]) -> None:
        """From a tier's thread: its blocks as events, in the engine's block hashes."""
        if not self.store.tiers[name].kv_events:
            return
        events = []
        with self._events_lock:
            for key in keys:
                info = self._key_info.get(key)
                group, hashes, parent, tokens = info or (self.blocks.group_of(key), [self.blocks.hash_of(key)],
                                                         None, [])
                if group is None:
                    continue
                window = self.layout.groups[group].sliding_window
                if what == "stored":
                    full = self.cfg.self_describing_kv_events and info is not None
                    events.append(kv_events.stored(hashes, parent if full else None, tokens if full else [],
                                                   self.layout.block_size, kind, group, window))
                else:
                    events.append(kv_events.removed(hashes, kind, group))
            self._events.extend(events)

    def take_events(self) -> list:
        if getattr(self, "_events", None) is None:
            return []
        with self._events_lock:
            events, self._events = self._events, []
        return events

    # -- introspection -----------------------------------------------------
    def stats(self) -> dict[str, dict[str, float]]:
        return tier_stats(self.store.stats(), self.offload_tokens)

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.lookups.close()
            if getattr(self, "_saver", None) is not None:
                self._saver.shutdown(wait=True)
            self.store.close()


def tier_stats(store_stats: dict[str, dict], tokens_per_block: int) -> dict[str, dict[str, float]]:
    """The store's per-tier counters (in blocks and bytes) in the engine's metric terms."""
    out = {}
    for tier, s in store_stats.items():
        out[tier] = {
            "lookup_tokens": s.get("lookups", 0) * tokens_per_block,
            "hit_tokens": s.get("hits", 0) * tokens_per_block,
            "bytes_in": s.get("bytes_in", 0), "bytes_out": s.get("bytes_out", 0),
            "usage_bytes": s.get("usage_bytes", s.get("used_bytes", 0)),
            "errors": s.get("errors", 0), "corrupt_blocks": s.get("corrupt", s.get("corrupt_blocks", 0)),
        }
    return out
