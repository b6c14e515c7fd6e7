"""Continuous batching with chunked prefill and block-level preemption.

Every step has a token budget. Running requests go first (a decode costs one
token, an unfinished prefill continues in chunks), then waiting requests are
admitted with the longest prefix the device pool holds, extended by what the KV
connector's tiers hold. Tier hits load in the background: such a request waits
(WAITING_FOR_REMOTE_KVS) while other requests keep stepping. When the pool runs
short the newest running request is preempted: its blocks are freed (they stay
in the prefix cache, and in the connector's tiers) and it resumes later from
whatever of its prefix is still cached.
"""
from __future__ import annotations

import time

from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """After this step the request has all its tokens' KV: sample its next one."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens >= r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_preempted: int = 0
    finished_req_ids: set[str] = field(default_factory=set)
    failed: list[Request] = field(default_factory=list)  # ended by a failed KV load

    @property
    def total_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, connector=None, load_failure_policy: str = "recompute"):
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.connector = connector
        self.load_failure_policy = load_failure_policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: dict[str, Request] = {}  # WAITING_FOR_REMOTE_KVS
        self.held: dict[str, Request] = {}     # finished, blocks still read by a store
        self.num_preemptions_total = 0
        self._finished_ids: set[str] = set()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    # -- planning ----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = set()
        if self.connector is not None:
            self._collect_connector_results(out)
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv_cache.allocate_slots(req.request_id, req.num_computed_tokens, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    num_new = 0
                    break
            if num_new == 0:
                break
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
            i += 1

        # Admitting new work right after preempting would only thrash the pool.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.num_preempted:
            req = self.waiting[0]
            hit = None
            num_computed = req.num_computed_tokens  # > 0 only when a tier load just landed
            if num_computed == 0:
                hit = self.kv_cache.find_prefix_hit(req.block_hashes, req.num_tokens)
                num_computed = hit.num_tokens
                external, is_async = self._external_hit(req, num_computed)
                if external:
                    if not self.kv_cache.allocate_slots(req.request_id, num_computed, external, hit):
                        break
                    req.num_computed_tokens = num_computed  # the connector loads from here on
                    req.num_external_tokens = external
                    self.connector.update_state_after_alloc(req, self.kv_cache.block_ids(req.request_id), external)
                    self._record_hit(req, num_computed + external)
                    self._mark_scheduled(req)
                    self.waiting.popleft()
                    if is_async:
                        req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
                        self.loading[req.request_id] = req
                        continue
                    self.waiting.appendleft(req)
                    hit, num_computed = None, num_computed + external
                    req.num_computed_tokens = num_computed
            num_new = min(req.num_tokens - num_computed, budget)
            if not self.kv_cache.allocate_slots(req.request_id, num_computed, num_new, hit):
                break
            self.waiting.popleft()
            self._record_hit(req, num_computed)
            self._mark_scheduled(req)
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
        return out

    @staticmethod
    def _mark_scheduled(req: Request) -> None:
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()

    def _external_hit(self, req: Request, num_computed: int) -> tuple[int, bool]:
        if self.connector is None:
            return 0, False
        external, is_async = self.connector.get_num_new_matched_tokens(req, num_computed)
        # Always leave the last prompt token to compute: its logits are needed.
        external = max(0, min(external, req.num_tokens - 1 - num_computed))
        return external, is_async

    def _record_hit(self, req: Request, num_cached: int) -> None:
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_cached
            self.kv_cache.record_query(req.num_prompt_tokens, num_cached)

    def _collect_connector_results(self, out: SchedulerOutput) -> None:
        sent, received = self.connector.get_finished(out.finished_req_ids)
        for rid in sent:
            req = self.held.pop(rid, None)
            if req is not None:
                self.kv_cache.free(rid)
        if not received:
            return
        failed_blocks = self.connector.get_block_ids_with_load_errors()
        for rid in received:
            req = self.loading.pop(rid, None)
            if req is None:
                continue
            if req.is_finished:  # aborted while loading: the load no longer writes its blocks
                self.kv_cache.free(rid)
                continue
            loaded = req.num_computed_tokens + req.num_external_tokens
            good = self._tokens_before_first_failed_block(rid, loaded, failed_blocks)
            if good < loaded:
                if self.load_failure_policy == "fail":
                    req.status = RequestStatus.FINISHED_ERROR
                    req.finished_time = time.monotonic()
                    req.stop_reason = f"KV load failed for {loaded - good} of {loaded} cached tokens"
                    self.kv_cache.free(rid)
                    out.failed.append(req)
                    continue
                # Recompute what failed; the cached-token count reports what was really served.
                req.num_cached_tokens -= loaded - good
                self.kv_cache.num_hits -= loaded - good
                loaded = good
            req.num_computed_tokens = loaded
            req.num_external_tokens = 0
            self.kv_cache.cache_blocks(rid, req.block_hashes, loaded)
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)

    def _tokens_before_first_failed_block(self, rid: str, loaded: int, failed: set[int]) -> int:
        if not failed:
            return loaded
        bs = self.kv_cache.block_size
        good = loaded
        for table in self.kv_cache.block_ids(rid):
            for i, block_id in enumerate(table[:-(-loaded // bs)]):
                if block_id in failed:
                    good = min(good, i * bs)
                    break
        return good

    def _preempt(self, req: Request) -> None:
        self.kv_cache.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(req)

    # -- after the step ----------------------------------------------------
    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress and publish newly full blocks to the prefix cache."""
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            self.kv_cache.cache_blocks(req.request_id, req.block_hashes, req.num_computed_tokens)

    def finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        req.finished_time = time.monotonic()
        self._finished_ids.add(req.request_id)
        if req.request_id in self.loading:
            return  # its blocks are freed when the load lands
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if self.connector is not None and self.connector.request_finished(
                req, self.kv_cache.block_ids(req.request_id)):
            self.held[req.request_id] = req
            return
        self.kv_cache.free(req.request_id)
