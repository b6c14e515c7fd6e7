"""Continuous batching with chunked prefill and block-level preemption.

Every step has a token budget. Running requests go first (a decode costs one
token, an unfinished prefill continues in chunks), then waiting requests are
admitted, longest device prefix-cache hit first computed by the KV cache
manager. When the pool runs short the newest running request is preempted: its
blocks are freed (they stay in the prefix cache) and it is recomputed later.
"""
from __future__ import annotations

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

    @property
    def total_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions_total = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[str] = set()

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
            scheduled_ids.add(req.request_id)
            budget -= num_new
            i += 1

        # Admitting new work right after preempting would only thrash the pool.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.num_preempted:
            req = self.waiting[0]
            hit = self.kv_cache.find_prefix_hit(req.block_hashes, req.num_tokens)
            num_computed = hit.num_tokens
            num_new = min(req.num_tokens - num_computed, budget)
            if not self.kv_cache.allocate_slots(req.request_id, num_computed, num_new, hit):
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed
                self.kv_cache.record_query(req.num_prompt_tokens, num_computed)
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
        return out

    def _preempt(self, req: Request) -> None:
        self.kv_cache.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(req)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress and publish newly full blocks to the prefix cache."""
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            self.kv_cache.cache_blocks(req.request_id, req.block_hashes, req.num_computed_tokens)

    def finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv_cache.free(req.request_id)
