"""Continuous batching with chunked prefill, tier loads and preemption.

Every step has a token budget. Running requests go first (a decode costs one
token, an unfinished prefill continues in chunks), then waiting requests are
admitted with the longest prefix the device pool holds, extended by what the
KV connector's tiers hold. A tier lookup still in flight skips the request
for this step; a tier hit loads in the background while the request waits
(WAITING_FOR_REMOTE_KVS) and other requests keep stepping. No step waits on
a tier.

When the pool runs short the newest running request is preempted: its blocks
are freed (they stay in the prefix cache, and in the connector's tiers) and
it resumes later from whatever of its prefix is still cached, recomputing
the rest.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvtier.engine.core.kv_cache import KVCacheManager
from kvtier.engine.core.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    """One request's share of a step: `num_new_tokens` computed after its
    `num_computed_tokens`."""
    request: Request
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """After this step the request has all its tokens' KV: sample its next one."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens >= r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledChunk] = field(default_factory=list)
    num_preempted: int = 0
    finished_req_ids: set[str] = field(default_factory=set)
    failed: list[Request] = field(default_factory=list)  # ended here: a failed KV load, or can never fit

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
        self.held: dict[str, Request] = {}     # finished, blocks still read by a connector
        self.num_asking: int = 0               # waiting on a tier lookup after the last schedule()
        self.num_preemptions_total = 0
        self.num_failed_loads_total = 0  # tier loads that did not land whole (failed or past their deadline)
        self._finished_ids: set[str] = set()
        self._unattributed_failures: set[int] = set()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    @property
    def waiting_on_tiers(self) -> bool:
        """Nothing to compute for now, only tier lookups or loads to wait for."""
        return bool(self.loading or self.num_asking)

    # -- planning ----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = set()
        if self.connector is not None:
            self._collect_transfers(out)
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        # Admitting new work right after preempting would only thrash the pool.
        if not out.num_preempted:
            self._schedule_waiting(out, budget)
        out.finished_req_ids |= self._finished_ids  # requests this very call ended
        self._finished_ids = set()
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
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
            out.scheduled.append(ScheduledChunk(req, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        asking: list[Request] = []  # their tier lookups are still in flight: ask again next step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.num_computed_tokens:  # its tier load landed: it holds its blocks already
                admitted = self._admit(req, req.num_computed_tokens, budget, out)
            else:
                hit = self.kv_cache.find_prefix_hit(req.block_hashes, req.num_tokens)
                external, is_async = self._external_hit(req, hit.num_tokens)
                if external is None:
                    asking.append(self.waiting.popleft())
                    continue
                if external and is_async:
                    if not self._start_load(req, hit, external):
                        if self._never_fits(req, out):
                            continue
                        break
                    continue
                admitted = self._admit(req, hit.num_tokens, budget, out, hit, external)
            if admitted is None:
                continue  # ended: it can never fit
            if not admitted:
                break
            budget -= out.scheduled[-1].num_new_tokens
        self.waiting.extendleft(reversed(asking))
        self.num_asking = len(asking)

    def _admit(self, req: Request, num_computed: int, budget: int, out: SchedulerOutput, hit=None,
               external: int = 0) -> bool | None:
        """Into the running batch with a chunk of at most `budget`; False when
        the pool is short, None when the request ended because it never fits."""
        computed = num_computed + external
        num_new = min(req.num_tokens - computed, budget)
        if not self.kv_cache.allocate_slots(req.request_id, num_computed, num_new, hit, external):
            return None if self._never_fits(req, out) else False
        self.waiting.popleft()
        self._mark_scheduled(req)
        req.num_computed_tokens = num_computed
        if external:  # loaded by the connector in this very step, before the forward pass
            self.connector.update_state_after_alloc(req, self.kv_cache.block_ids(req.request_id), external)
            req.num_computed_tokens = computed
        self._record_hit(req, computed)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        out.scheduled.append(ScheduledChunk(req, num_new))
        return True

    def _start_load(self, req: Request, hit, external: int) -> bool:
        """Blocks for the device hit and the tier hit; the connector loads the
        latter in the background. False when the pool is short."""
        if not self.kv_cache.allocate_slots(req.request_id, hit.num_tokens, 0, hit, external):
            return False
        self.waiting.popleft()
        self._mark_scheduled(req)
        req.num_computed_tokens = hit.num_tokens  # the connector loads from here on
        req.num_external_tokens = external
        self.connector.update_state_after_alloc(req, self.kv_cache.block_ids(req.request_id), external)
        req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self.loading[req.request_id] = req
        return True

    def _never_fits(self, req: Request, out: SchedulerOutput) -> bool:
        """The head of the queue found the pool short. If no other request holds
        a block, waiting cannot help: it ends with an error (True). Waiting
        requests that hold blocks from a landed load give them back first."""
        if self.running or self.loading or self.held:
            return False
        holders = [r for r in self.waiting if r is not req and r.num_computed_tokens]
        if holders:
            for r in holders:  # their loaded blocks stay in the prefix cache
                self.kv_cache.cache_blocks(r.request_id, r.block_hashes, r.num_computed_tokens, r.all_token_ids)
                self.kv_cache.free(r.request_id)
                r.num_computed_tokens = 0
            return False
        self.waiting.remove(req)
        req.stop_reason = (f"the request needs more KV cache blocks than the pool's {self.kv_cache.pool.num_blocks - 1}"
                           " even with nothing else running")
        self._end(req, RequestStatus.FINISHED_ERROR)
        out.failed.append(req)
        return True

    @staticmethod
    def _mark_scheduled(req: Request) -> None:
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()

    def _external_hit(self, req: Request, num_computed: int) -> tuple[int | None, bool]:
        if self.connector is None or req.skip_connector:
            return 0, False
        external, is_async = self.connector.get_num_new_matched_tokens(req, num_computed)
        if external is None:
            return None, False
        # Always leave the last prompt token to compute: its logits are needed.
        return max(0, min(external, req.num_tokens - 1 - num_computed)), is_async

    def _record_hit(self, req: Request, num_cached: int) -> None:
        """Cached tokens are counted once, when the request first runs: what was really served."""
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_cached
            self.kv_cache.record_query(req.num_prompt_tokens, num_cached)

    # -- what the connector finished ---------------------------------------
    def _collect_transfers(self, out: SchedulerOutput) -> None:
        done = self.connector.take_finished(out.finished_req_ids)
        for rid in done.sent:
            if self.held.pop(rid, None) is not None:
                self.kv_cache.free(rid)
        self._unattributed_failures |= done.unattributed_failed_blocks
        for rid, failed in done.loaded.items():
            req = self.loading.pop(rid, None)
            if req is None:
                continue
            if req.is_finished:  # ended while loading: the load no longer writes its blocks
                self.kv_cache.free(rid)
                continue
            self._land(req, failed | self._claim_unattributed(rid), out)
        if not self.loading:
            self._unattributed_failures.clear()

    def _claim_unattributed(self, rid: str) -> set[int]:
        if not self._unattributed_failures:
            return set()
        mine = {b for table in self.kv_cache.block_ids(rid) for b in table} & self._unattributed_failures
        self._unattributed_failures -= mine
        return mine

    def _land(self, req: Request, failed: set[int], out: SchedulerOutput) -> None:
        rid = req.request_id
        loaded = req.num_computed_tokens + req.num_external_tokens
        good = self._tokens_before_first_failed_block(rid, req.num_computed_tokens, loaded, failed)
        req.num_external_tokens = 0
        if good == loaded:
            req.num_computed_tokens = loaded
            self.kv_cache.cache_blocks(rid, req.block_hashes, loaded, req.all_token_ids)
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
            return
        self.num_failed_loads_total += 1
        if self.load_failure_policy == "fail":
            self.kv_cache.free(rid)
            req.stop_reason = f"KV load failed for {loaded - good} of {loaded} cached tokens"
            self._end(req, RequestStatus.FINISHED_ERROR)
            out.failed.append(req)
            return
        # Rebuilt from scratch: what did land goes to the prefix cache, every
        # block is given back, and the request is admitted again as if new (a
        # fresh device hit, no stale block ahead of it, nothing written into a
        # shared block). It does not go back to the tiers: it computes the rest.
        self.kv_cache.cache_blocks(rid, req.block_hashes, good, req.all_token_ids)
        self.kv_cache.free(rid)
        req.num_computed_tokens = 0
        req.skip_connector = True
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _tokens_before_first_failed_block(self, rid: str, start: int, loaded: int, failed: set[int]) -> int:
        if not failed:
            return loaded
        bs = self.kv_cache.block_size
        good = loaded
        for table in self.kv_cache.block_ids(rid):
            for i in range(start // bs, min(len(table), -(-loaded // bs))):
                if table[i] in failed:
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
            self.kv_cache.cache_blocks(req.request_id, req.block_hashes, req.num_computed_tokens,
                                       req.all_token_ids)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stopped, aborted); its blocks go back now, or once
        its load or the connector's reads of them are done."""
        loading = req.request_id in self.loading
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._end(req, status, free=not loading)

    def _end(self, req: Request, status: RequestStatus, free: bool = True) -> None:
        """The one place a request ends: the connector hears of it whichever way it went."""
        req.status = status
        req.finished_time = time.monotonic()
        self._finished_ids.add(req.request_id)
        if self.connector is not None and self.connector.request_finished(
                req, self.kv_cache.block_ids(req.request_id)) and free:
            self.held[req.request_id] = req
            return
        if free:
            self.kv_cache.free(req.request_id)
