"""Continuous batching with chunked prefill, tier loads and preemption.

Every step has a token budget. Running requests go first (a decode costs one
token, an unfinished prefill continues in chunks), then waiting requests are
admitted with the longest prefix the device pool holds, extended by what the
KV connector's tiers hold. A tier lookup still in flight skips the request
for this step; a tier hit loads in the background while the request waits
(WAITING_FOR_REMOTE_KVS) and other requests keep stepping. No step waits on
a tier.

Order: under `fcfs` by arrival; under `priority` by (priority, arrival), lower
first, and a waiting request may preempt a running one of lower priority.

Long prefills (vLLM's --long-prefill-token-threshold, off by default): a
prefill of more than the threshold gets at most that many tokens a step, and
only `max_long_partial_prefills` of them (of `max_num_partial_prefills`
prefills that do not complete this step) get a chunk at all; decodes and short
prefills go first. A short follow-up then waits one short step, not behind
another user's whole cold prefill; a long prefill held back keeps its place.

Preemption when the pool runs short takes the lowest running request (the
latest among equals). In `swap` mode it gives up only as many blocks as the
step lacks, from the tail of its table: the connector keeps their KV (the
partial last block included) in its CPU tier, the victim keeps its prefix on
device, and when it is admitted again the rest loads back through the async
load path. If the connector declines or has lost the copy, or the load
fails, the victim recomputes. In `recompute` mode it gives every block back
(full ones stay in the prefix cache and the tiers) and recomputes the rest.
"""
from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from kvtier.engine.core.kv_cache import KVCacheManager
from kvtier.engine.core.request import Request, RequestStatus
from kvtier.engine.core.stats import RESTORE_BUCKETS, Histogram


class Admission(Enum):
    """What trying the head of the queue came to."""
    ADMITTED = "admitted"   # in the running batch with a chunk this step
    STARTED = "started"     # a tier load or a swap-in is under way
    ASKING = "asking"       # its tier lookup is in flight: ask again next step
    AGAIN = "again"         # its swapped KV is gone: try it again as a recompute
    SHORT = "short"         # the pool lacks blocks for it
    DEFERRED = "deferred"   # a long prefill while the step has its share of them: next step


@dataclass
class ScheduledChunk:
    """One request's share of a step: `num_new_tokens` computed after its
    `num_computed_tokens`."""
    request: Request
    num_new_tokens: int
    # After this step the request has all its tokens' KV: sample its next one.
    # Fixed when the chunk is made: once the step advances the request, the
    # same sum would call a partial chunk complete.
    completes_prompt: bool = field(init=False)

    def __post_init__(self) -> None:
        r = self.request
        self.completes_prompt = r.num_computed_tokens + self.num_new_tokens >= r.num_tokens


@dataclass(frozen=True)
class PrefillLimits:
    """vLLM's partial-prefill knobs; long_threshold 0 switches them all off."""
    long_threshold: int = 0
    max_partial: int = 1  # prefills that do not complete this step, long or cut by the budget
    max_long: int = 1     # of those, long ones (more than long_threshold tokens to go)

    def is_long(self, req: Request) -> bool:
        return 0 < self.long_threshold < req.num_tokens - req.num_computed_tokens


class PrefillCount:
    """This step's partial prefills, against PrefillLimits."""

    def __init__(self, limits: PrefillLimits) -> None:
        self.limits = limits
        self.partial = self.long = 0

    def chunk(self, remaining: int, budget: int) -> int:
        """Tokens a prefill with `remaining` to go may compute now (0: none this step)."""
        lim = self.limits
        num_new = min(remaining, budget, lim.long_threshold or remaining)
        if lim.long_threshold and num_new < remaining:
            is_long = remaining > lim.long_threshold
            if self.partial >= lim.max_partial or (is_long and self.long >= lim.max_long):
                return 0
        return num_new

    def add(self, remaining: int, num_new: int) -> None:
        if self.limits.long_threshold and num_new < remaining:
            self.partial += 1
            self.long += remaining > self.limits.long_threshold


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
                 max_model_len: int, connector=None, load_failure_policy: str = "recompute",
                 preemption_mode: str = "recompute", scheduling_policy: str = "fcfs",
                 prefill_limits: PrefillLimits = PrefillLimits()):
        self.kv_cache = kv_cache
        self.prefill_limits = prefill_limits
        self.swap = preemption_mode == "swap"
        self.by_priority = scheduling_policy == "priority"
        self._arrivals = itertools.count()
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
        self.num_swapped_out_blocks_total = 0
        self.num_swapped_in_blocks_total = 0
        self.num_swap_fallbacks_total = 0  # swapped victims that recomputed after all
        self.num_recomputed_tokens_total = 0  # computed again after a preemption, in either mode
        self.restore_time = Histogram(RESTORE_BUCKETS)
        self._admitted_now: set[str] = set()
        self._preempted_now: set[str] = set()
        self._finished_ids: set[str] = set()
        self._unattributed_failures: set[int] = set()

    def add(self, request: Request) -> None:
        request.arrival_seq = next(self._arrivals)
        if self.connector is not None:  # the request policy's on_new_request may set it
            priority = self.connector.request_priority(request)
            if priority is not None:
                request.priority = priority
        self._enqueue(request)

    # -- order -------------------------------------------------------------
    @staticmethod
    def _rank(req: Request) -> tuple[int, int]:
        return req.priority, req.arrival_seq

    def _enqueue(self, req: Request, front: bool = False) -> None:
        """Into the waiting queue: by rank under `priority`; under `fcfs` at the
        back when new, at the front when it had been scheduled already."""
        if self.by_priority:
            bisect.insort(self.waiting, req, key=self._rank)
        elif front:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def _run(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        if self.by_priority:
            bisect.insort(self.running, req, key=self._rank)
        else:
            self.running.append(req)

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
        self._admitted_now = set()
        self._preempted_now = set()
        if self.connector is not None:
            self._collect_transfers(out)
        prefills = PrefillCount(self.prefill_limits)
        budget = self._schedule_running(out, self.max_num_batched_tokens, prefills)
        # Admitting new work right after preempting would only thrash the pool.
        if not out.num_preempted:
            self._schedule_waiting(out, budget, prefills)
        out.finished_req_ids |= self._finished_ids  # requests this very call ended
        self._finished_ids = set()
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, prefills: PrefillCount) -> int:
        # Decodes and short prefills first, long prefills after (with limits on, else in rank order).
        limits = self.prefill_limits
        order = sorted(self.running, key=limits.is_long) if limits.long_threshold else list(self.running)
        scheduled: set[str] = set()
        for req in order:
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted for one before it this step
                continue
            remaining = req.num_tokens - req.num_computed_tokens
            num_new = prefills.chunk(remaining, budget)
            if num_new == 0:
                continue  # a long prefill beyond this step's share: it keeps its blocks and place
            while not self.kv_cache.allocate_slots(req.request_id, req.num_computed_tokens, num_new):
                # The lowest running request not scheduled yet this step (itself, at worst).
                victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)
                # Before it gives itself up: blocks held by waiting requests (a landed
                # load deferred by the long-prefill cap, say) would otherwise starve it
                # for ever, preempted and readmitted each step while they wait on it.
                if victim is req and self._reclaim_from_waiting(req):
                    continue
                self._preempt(victim, None if victim is req else self.kv_cache.last_shortfall)
                out.num_preempted += 1
                if victim is req:
                    num_new = 0
                    break
            if num_new == 0:
                continue
            out.scheduled.append(ScheduledChunk(req, num_new))
            scheduled.add(req.request_id)
            prefills.add(remaining, num_new)
            budget -= num_new
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, prefills: PrefillCount) -> None:
        # Tier lookups still in flight, and long prefills past this step's share:
        # skipped for now, back at the front in their order.
        skipped: list[Request] = []
        num_asking = 0
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.request_id in self._preempted_now:
                break  # its swapped KV is copied out only as this step starts: back next step
            result = self._try_admit(req, budget, out, prefills)
            if result in (Admission.ASKING, Admission.DEFERRED):
                skipped.append(self.waiting.popleft())
                num_asking += result is Admission.ASKING
            elif result is Admission.ADMITTED:
                budget -= out.scheduled[-1].num_new_tokens
            elif result is Admission.SHORT:
                freed = self._preempt_for(req, out)
                if freed is not None:
                    budget += freed
                elif not self._never_fits(req, out):
                    break
        self.waiting.extendleft(reversed(skipped))
        self.num_asking = num_asking

    def _try_admit(self, req: Request, budget: int, out: SchedulerOutput, prefills: PrefillCount) -> Admission:
        if req.swapped_upto:  # preempted with its KV kept: load it back
            return self._start_restore(req)
        if req.num_computed_tokens:  # its tier load landed, or it kept its blocks: it holds them already
            return self._admit(req, req.num_computed_tokens, budget, out, prefills)
        hit = self.kv_cache.find_prefix_hit(req.block_hashes, req.num_tokens)
        external, is_async = self._external_hit(req, hit.num_tokens)
        if external is None:
            return Admission.ASKING
        if external and is_async:
            return self._start_load(req, hit, external)
        return self._admit(req, hit.num_tokens, budget, out, prefills, hit, external)

    def _admit(self, req: Request, num_computed: int, budget: int, out: SchedulerOutput, prefills: PrefillCount,
               hit=None, external: int = 0) -> Admission:
        """Into the running batch with a chunk of at most `budget` (and the long-prefill cap)."""
        computed = num_computed + external
        remaining = req.num_tokens - computed
        num_new = prefills.chunk(remaining, budget)
        if num_new == 0:
            return Admission.DEFERRED
        if not self.kv_cache.allocate_slots(req.request_id, num_computed, num_new, hit, external):
            return Admission.SHORT
        self.waiting.popleft()
        self._mark_scheduled(req)
        req.num_computed_tokens = num_computed
        if external:  # loaded by the connector in this very step, before the forward pass
            self.connector.update_state_after_alloc(req, self.kv_cache.block_ids(req.request_id), external)
            req.num_computed_tokens = computed
        self._record_hit(req, computed)
        self._run(req)
        self._admitted_now.add(req.request_id)
        out.scheduled.append(ScheduledChunk(req, num_new))
        prefills.add(remaining, num_new)
        return Admission.ADMITTED

    def _start_load(self, req: Request, hit, external: int) -> Admission:
        """Blocks for the device hit and the tier hit; the connector loads the
        latter in the background."""
        if not self.kv_cache.allocate_slots(req.request_id, hit.num_tokens, 0, hit, external):
            return Admission.SHORT
        self.waiting.popleft()
        self._mark_scheduled(req)
        req.num_computed_tokens = hit.num_tokens  # the connector loads from here on
        req.num_external_tokens = external
        self.connector.update_state_after_alloc(req, self.kv_cache.block_ids(req.request_id), external)
        self._wait_for_load(req)
        return Admission.STARTED

    def _start_restore(self, req: Request) -> Admission:
        """A swapped-out victim: blocks for what it gave up, loaded back by the
        connector from where it kept them; a recompute if it no longer can."""
        rid, start, end = req.request_id, req.num_computed_tokens, req.swapped_upto
        if not self.kv_cache.allocate_slots(rid, start, 0, None, end - start):
            return Admission.SHORT
        blocks = self.connector.swap_in(req, self.kv_cache.block_ids(rid), start, end)
        if not blocks:
            self._fall_back_to_recompute(req)
            return Admission.AGAIN
        self.waiting.popleft()
        self.num_swapped_in_blocks_total += blocks
        req.num_external_tokens = end - start
        req.restore_started = time.monotonic()
        self._wait_for_load(req)
        return Admission.STARTED

    def _wait_for_load(self, req: Request) -> None:
        req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self.loading[req.request_id] = req

    def _fall_back_to_recompute(self, req: Request) -> None:
        """A swapped victim whose KV cannot come back: every block goes (full
        ones stay in the prefix cache) and it starts again as a new request."""
        self.connector.drop_swap(req)
        self.kv_cache.cache_blocks(req.request_id, req.block_hashes, req.num_computed_tokens, req.all_token_ids)
        self.kv_cache.free(req.request_id)
        req.num_computed_tokens = 0
        req.swapped_upto = 0
        self.num_swap_fallbacks_total += 1

    def _preempt_for(self, req: Request, out: SchedulerOutput) -> int | None:
        """Under `priority`: the pool is short for waiting `req`; preempt the
        lowest running request if it ranks below `req`. Returns the budget its
        unscheduled chunk gives back (None: nothing preempted)."""
        if not self.by_priority or not self.running:
            return None
        victim = self.running[-1]
        if self._rank(victim) <= self._rank(req) or victim.request_id in self._admitted_now:
            return None  # (one admitted this step may have a load into its blocks still to come)
        chunk = next((c for c in out.scheduled if c.request is victim), None)
        if chunk is not None:
            out.scheduled.remove(chunk)
        self._preempt(victim, self.kv_cache.last_shortfall)
        out.num_preempted += 1
        return chunk.num_new_tokens if chunk is not None else 0

    def _never_fits(self, req: Request, out: SchedulerOutput) -> bool:
        """The head of the queue found the pool short. If no other request holds
        a block, waiting cannot help: it ends with an error (True). Waiting
        requests that hold blocks (a landed load, a victim's kept prefix) give
        them back first, from the back of the queue, until the head's shortfall
        is covered."""
        if self.running or self.loading or self.held or self._reclaim_from_waiting(req):
            return False
        self.waiting.remove(req)
        req.stop_reason = (f"the request needs more KV cache blocks than the pool's {self.kv_cache.pool.num_blocks - 1}"
                           " even with nothing else running")
        self._end(req, RequestStatus.FINISHED_ERROR)
        out.failed.append(req)
        return True

    def _reclaim_from_waiting(self, req: Request) -> bool:
        """Waiting requests other than `req` that hold blocks give them back,
        from the back of the queue, until `req`'s last shortfall is covered.
        False when none holds any."""
        holders = [r for r in self.waiting if r is not req and r.num_computed_tokens]
        if not holders:
            return False
        wanted = self.kv_cache.pool.num_free_blocks + self.kv_cache.last_shortfall
        for r in reversed(holders):  # full blocks stay in the prefix cache
            self.kv_cache.cache_blocks(r.request_id, r.block_hashes, r.num_computed_tokens, r.all_token_ids)
            self._give_up_blocks(r, None)  # swapped out whole (joining a swapped tail), or given back
            if self.kv_cache.pool.num_free_blocks >= wanted:
                break
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
        restored, req.swapped_upto = bool(req.swapped_upto), 0
        if good == loaded:
            req.num_computed_tokens = loaded
            self.kv_cache.cache_blocks(rid, req.block_hashes, loaded, req.all_token_ids)
            req.status = RequestStatus.WAITING
            if restored:
                self.restore_time.observe(time.monotonic() - req.restore_started)
            self._enqueue(req, front=True)
            return
        self.num_failed_loads_total += 1
        self.num_swap_fallbacks_total += restored
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
        self._enqueue(req, front=True)

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

    def _preempt(self, req: Request, blocks_wanted: int | None) -> None:
        """Out of the running batch, its blocks given up (_give_up_blocks)."""
        self.running.remove(req)
        self._preempted_now.add(req.request_id)
        self._give_up_blocks(req, blocks_wanted)
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self._enqueue(req, front=True)

    def _give_up_blocks(self, req: Request, blocks_wanted: int | None) -> None:
        """Swap mode gives up `blocks_wanted` blocks from the tail (None: all)
        and has the connector keep the KV they held (joined to a tail it kept
        already, if any); recompute mode, or a declined swap, gives up every
        block and recomputes."""
        rid, end = req.request_id, req.num_computed_tokens
        if self.swap and end:
            start = self.kv_cache.truncation_point(rid, blocks_wanted) if blocks_wanted else 0
            if start >= end:  # only blocks past its computed tokens go: nothing to keep elsewhere
                self.kv_cache.truncate(rid, start)
                return
            blocks = self.connector.swap_out(req, self.kv_cache.block_ids(rid), start, end)
            if blocks:
                self.kv_cache.truncate(rid, start)
                req.num_computed_tokens, req.swapped_upto = start, max(end, req.swapped_upto)
                self.num_swapped_out_blocks_total += blocks
                self._preempted_now.add(rid)  # its copy is made as this step starts: no swap-in before
                return
        if req.swapped_upto:  # its kept tail is no use without the prefix
            self._fall_back_to_recompute(req)
            return
        self.kv_cache.free(rid)
        req.num_computed_tokens = 0

    # -- after the step ----------------------------------------------------
    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress and publish newly full blocks to the prefix cache."""
        for s in out.scheduled:
            req = s.request
            done = req.num_computed_tokens + s.num_new_tokens
            self.num_recomputed_tokens_total += max(0, min(done, req.num_computed_peak) - req.num_computed_tokens)
            req.num_computed_tokens = done
            req.num_computed_peak = max(req.num_computed_peak, done)
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
