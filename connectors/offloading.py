"""OffloadingConnector: the device pool's blocks saved to, and loaded from, a
TieredStore (a host-memory CPU tier, then any secondary tiers).

The unit of transfer is the offload block: `block_size` tokens (a whole number
of device blocks), all layers of one KV cache group in one object, keyed by the
chained hash of its last device block, so a key names the whole prefix.

Loads run on the store's threads: the request waits (WAITING_FOR_REMOTE_KVS)
while the step loop serves others, and the landed blocks are copied into the
device blocks allocated for them. Saves gather the step's newly full offload
blocks with one batched copy per group and hand them to the store, which
writes them down its tiers in the background.
"""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from connectors.base import ConnectorMetadata, ConnectorRequest, KVConnectorBase, KVLayout, StepPlan
from connectors.config import KVTransferConfig
from connectors.staging import StagingBuffers
from kvstore.keys import layout_id, make_key
from kvstore.tiered_store import TieredStore
from policies.registry import make_request_policy
from policies.request_policy import RequestDecision, RequestInfo

logger = logging.getLogger("kvtier.connectors")


class OffloadingConfig(BaseModel):
    """`kv_connector_extra_config` of the OffloadingConnector (vLLM's keys, plus ours)."""
    model_config = ConfigDict(extra="forbid")

    spec_name: Literal["CPUOffloadingSpec", "TieringOffloadingSpec"] = "CPUOffloadingSpec"
    spec_module_path: str | None = None  # vLLM's; only the built-in specs exist here
    cpu_bytes_to_use: int = Field(1 << 30, gt=0)
    num_cpu_blocks: int | None = Field(None, gt=0)  # vLLM's older sizing knob; wins when given
    block_size: int | None = Field(None, gt=0)  # offload block, tokens
    eviction_policy: str = "lru"
    cache_policy_module_path: str | None = None
    store_threshold: int = Field(1, ge=1)
    offload_prompt_only: bool = False
    secondary_tiers: list[dict[str, Any]] = Field(default_factory=list)
    write_mode: Literal["write_through", "write_back"] = "write_through"
    namespace: str = "default"
    request_policy: str = "default"
    request_policy_module_path: str | None = None
    request_policy_config: dict[str, Any] = Field(default_factory=dict)
    load_workers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _tiers_need_tiering(self):
        if self.secondary_tiers and self.spec_name != "TieringOffloadingSpec":
            raise ValueError("spec_name: secondary_tiers need 'TieringOffloadingSpec'")
        if self.spec_module_path:
            raise ValueError("spec_module_path: only the built-in specs are available")
        return self


def parse_extra_config(extra: dict, model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate(extra)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in ("kv_transfer_config", "kv_connector_extra_config", *err["loc"]))
        raise ValueError(f"{where}: {err['msg']}") from None


@dataclass
class PendingLoad:
    request_id: str
    keys: list[str] = field(default_factory=list)
    # Per key: device block ids to fill and the rows of the offload block they take.
    dst_blocks: list[list[int]] = field(default_factory=list)
    src_rows: list[list[int]] = field(default_factory=list)


@dataclass
class PendingSave:
    keys: list[str] = field(default_factory=list)
    src_blocks: list[list[int]] = field(default_factory=list)  # device blocks of each offload block
    write_tiers: frozenset[str] | None = None


@dataclass
class OffloadingMetadata(ConnectorMetadata):
    loads: list[PendingLoad]
    saves: list[PendingSave]


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
    def __init__(self, config: KVTransferConfig, layout: KVLayout):
        super().__init__(config, layout)
        self.cfg: OffloadingConfig = parse_extra_config(self.extra, OffloadingConfig)
        bs = layout.block_size
        self.offload_tokens = self.cfg.block_size or max(bs, (256 // bs) * bs)
        if self.offload_tokens % bs:
            raise ValueError(f"kv_transfer_config.kv_connector_extra_config.block_size: {self.offload_tokens} "
                             f"is not a multiple of the engine block size {bs}")
        self.blocks_per_offload = self.offload_tokens // bs
        self.block_shape = (self.blocks_per_offload, *layout.page_shape)
        block_bytes = torch.Size(self.block_shape).numel() * torch.empty((), dtype=layout.dtype).element_size()
        cpu_bytes = self.cfg.num_cpu_blocks * block_bytes if self.cfg.num_cpu_blocks else self.cfg.cpu_bytes_to_use
        self.store = TieredStore(
            block_shape=self.block_shape, dtype=layout.dtype, cpu_bytes=cpu_bytes,
            secondary_specs=self.cfg.secondary_tiers, model_fingerprint=layout.model_fingerprint,
            eviction_policy=self.cfg.eviction_policy, cache_policy_module_path=self.cfg.cache_policy_module_path,
            write_mode=self.cfg.write_mode, block_tokens=self.offload_tokens)
        self.request_policy = make_request_policy(self.cfg.request_policy, self.cfg.request_policy_module_path,
                                                  **self.cfg.request_policy_config)
        self.layout_ids = [layout_id(layout.dtype, self.offload_tokens, g.index, self.block_shape)
                           for g in layout.groups]
        self.seen = BoundedCounter()
        self.decisions: dict[str, RequestDecision] = {}
        self.saved_upto: dict[str, int] = {}  # offload blocks of a request already in the store
        self.can_load = config.kv_role in ("kv_both", "kv_consumer")
        self.can_save = config.kv_role in ("kv_both", "kv_producer")
        self._pending_loads: list[PendingLoad] = []
        self._staging = StagingBuffers(self.block_shape, layout.dtype)
        self._closed = False
        self._lock = threading.Lock()
        self._finished_loads: set[str] = set()
        self._failed_blocks: set[int] = set()
        self.lookup_tokens = 0
        self.hit_tokens = 0
        # Finish queued stores before the interpreter tears down their threads;
        # a weak reference, so that a dropped engine's memory can still go.
        ref = weakref.ref(self)
        atexit.register(lambda: ref() and ref().shutdown())

    # -- keys --------------------------------------------------------------
    def key(self, group: int, block_hashes: list[bytes], offload_index: int) -> str:
        last = block_hashes[(offload_index + 1) * self.blocks_per_offload - 1]
        return make_key(self.cfg.namespace, self.layout.model_fingerprint, self.layout_ids[group], last)

    def _needed_offload_blocks(self, group_index: int, start: int, end: int, boundary: int) -> range:
        """Offload blocks of a group that a hit of blocks start..end-1 needs, when
        `boundary` is the first token computed after it."""
        window = self.layout.groups[group_index].sliding_window
        if window is None:
            return range(start, end)
        first_token = max(0, boundary - window + 1)
        return range(max(start, first_token // self.offload_tokens), end)

    def _decision(self, request: ConnectorRequest) -> RequestDecision:
        d = self.decisions.get(request.request_id)
        if d is None:
            info = RequestInfo(request.request_id, request.num_prompt_tokens, request.cache_salt)
            d = self.decisions[request.request_id] = self.request_policy.on_new_request(info)
            # First sight of the request: count its prompt's offload blocks for store_threshold.
            for j in range(request.num_prompt_tokens // self.offload_tokens):
                self.seen.bump(request.block_hashes[(j + 1) * self.blocks_per_offload - 1])
        return d

    # -- scheduler side ----------------------------------------------------
    def get_num_new_matched_tokens(self, request: ConnectorRequest, num_computed_tokens: int) -> tuple[int, bool]:
        decision = self._decision(request)
        hashes = request.block_hashes
        # Every whole offload block of the prompt may hit, the one holding the last
        # prompt token too: the scheduler then recomputes only that token.
        n_prompt = request.num_prompt_tokens
        n_max = n_prompt // self.offload_tokens
        start = num_computed_tokens // self.offload_tokens
        self.saved_upto[request.request_id] = max(start, self.saved_upto.get(request.request_id, 0))
        if not self.can_load or n_max <= start:
            return 0, False
        self.lookup_tokens += n_max * self.offload_tokens - num_computed_tokens
        tiers = decision.read_tiers
        hit = n_max
        # Full-attention groups need every block from `start`; a hit that a
        # sliding group cannot serve (a window block missing) shrinks until it can.
        for g in self.layout.groups:
            if g.sliding_window is None:
                keys = [self.key(g.index, hashes, j) for j in range(start, hit)]
                hit = start + self.store.lookup(keys, tiers)
        while hit > start:
            if all(self._group_has(g.index, hashes, start, hit, min(hit * self.offload_tokens, n_prompt - 1), tiers)
                   for g in self.layout.groups if g.sliding_window is not None):
                break
            hit -= 1
        if hit <= start:
            return 0, False
        tokens = min(hit * self.offload_tokens, n_prompt - 1) - num_computed_tokens
        if tokens <= 0:
            return 0, False
        self.hit_tokens += tokens
        return tokens, True

    def _group_has(self, group: int, hashes: list[bytes], start: int, end: int, boundary: int, tiers) -> bool:
        needed = self._needed_offload_blocks(group, start, end, boundary)
        keys = [self.key(group, hashes, j) for j in needed]
        return self.store.lookup(keys, tiers) == len(keys)

    def update_state_after_alloc(self, request: ConnectorRequest, block_ids: list[list[int]],
                                 num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        computed = request.num_computed_tokens
        start = computed // self.offload_tokens
        boundary = computed + num_external_tokens
        end = -(-boundary // self.offload_tokens)  # the last block may hold tokens still to compute
        load = PendingLoad(request.request_id)
        first_new_block = computed // self.layout.block_size  # device-hit blocks are in place already
        for g in self.layout.groups:
            table = block_ids[g.index]
            for j in self._needed_offload_blocks(g.index, start, end, boundary):
                rows = [r for r in range(self.blocks_per_offload)
                        if first_new_block <= j * self.blocks_per_offload + r < len(table)]
                load.keys.append(self.key(g.index, request.block_hashes, j))
                load.dst_blocks.append([table[j * self.blocks_per_offload + r] for r in rows])
                load.src_rows.append(rows)
        self.saved_upto[request.request_id] = end
        self._pending_loads.append(load)

    def build_connector_meta(self, plan: StepPlan) -> OffloadingMetadata:
        loads, self._pending_loads = self._pending_loads, []
        saves = self._plan_saves(plan) if self.can_save else []
        for rid in plan.finished_req_ids:
            self.decisions.pop(rid, None)
            self.saved_upto.pop(rid, None)
        return OffloadingMetadata(loads, saves)

    def _plan_saves(self, plan: StepPlan) -> list[PendingSave]:
        saves = []
        for s in plan.scheduled:
            req = s.request
            decision = self._decision(req)
            if not decision.store:
                continue
            done = s.num_computed_tokens + s.num_new_tokens
            if self.cfg.offload_prompt_only:
                done = min(done, req.num_prompt_tokens)
            first = self.saved_upto.get(req.request_id, 0)
            last = min(done // self.offload_tokens, len(req.block_hashes) // self.blocks_per_offload)
            if last <= first:
                continue
            self.saved_upto[req.request_id] = last
            save = PendingSave(write_tiers=decision.write_tiers)
            for j in range(first, last):
                if self.seen.get(req.block_hashes[(j + 1) * self.blocks_per_offload - 1]) < self.cfg.store_threshold:
                    continue
                for g in self.layout.groups:
                    blocks = s.block_ids[g.index][j * self.blocks_per_offload:(j + 1) * self.blocks_per_offload]
                    if len(blocks) < self.blocks_per_offload or 0 in blocks:
                        continue  # a sliding group already let part of it go
                    save.keys.append(self.key(g.index, req.block_hashes, j))
                    save.src_blocks.append(blocks)
            if save.keys:
                saves.append(save)
        return saves

    # -- worker side -------------------------------------------------------
    def start_load_kv(self, metadata: OffloadingMetadata) -> None:
        for load in metadata.loads:
            buffer = self._staging.acquire(len(load.keys))
            future = self.store.get_async(load.keys, buffer[:len(load.keys)],
                                          self.decisions.get(load.request_id, RequestDecision()).read_tiers)
            future.add_done_callback(lambda f, load=load, buffer=buffer: self._land(load, buffer, f))

    def _land(self, load: PendingLoad, buffer: torch.Tensor, future: Future) -> None:
        """On a store thread: copy what arrived into the request's device blocks."""
        try:
            n_ok = future.result()
        except Exception:  # the store promises misses, not raises; be safe anyway
            logger.exception("offload load failed")
            n_ok = 0
        try:
            dst, src = [], []
            for i in range(n_ok):
                dst.extend(load.dst_blocks[i])
                src.extend(i * self.blocks_per_offload + r for r in load.src_rows[i])
            if dst:
                pages = buffer.view(-1, *self.layout.page_shape)
                # Usually every row lands, in order: then no gather is needed.
                rows = pages[:len(src)] if src == list(range(len(src))) else pages[torch.tensor(src)]
                self.kv_cache.index_copy_(0, torch.tensor(dst), rows)
        except Exception:
            logger.exception("copying loaded blocks into the device pool failed")
            n_ok = 0
        finally:
            self._staging.release(buffer)
        failed = [b for blocks in load.dst_blocks[n_ok:] for b in blocks]
        with self._lock:
            self._failed_blocks.update(failed)
            self._finished_loads.add(load.request_id)

    def wait_for_save(self, metadata: OffloadingMetadata) -> None:
        for save in metadata.saves:
            ids = torch.tensor([b for blocks in save.src_blocks for b in blocks])
            # One batched gather: the blocks are free to be reused once it returns.
            buffer = self._staging.acquire(len(save.keys))
            data = buffer[:len(save.keys)]
            torch.index_select(self.kv_cache, 0, ids, out=data.view(-1, *self.layout.page_shape))
            try:
                # put_async copies what it keeps before it returns (into CPU-tier
                # slots, or clones), so the buffer is free again right after.
                self.store.put_async(save.keys, data, save.write_tiers)
            finally:
                self._staging.release(buffer)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        with self._lock:
            done, self._finished_loads = self._finished_loads, set()
        return set(), done

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # -- introspection -----------------------------------------------------
    def stats(self) -> dict[str, dict[str, float]]:
        return tier_stats(self.store.stats(), self.offload_tokens)

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
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
