"""A cache hit never changes an answer and never stalls the engine: hybrid
models through the tiers, load failures handed over with their loads, failed
loads rebuilt, no writer after a buffer is let go, other releases' objects
left alone, lookups off the step loop with deadlines, clients that never
wait forever, and per-request connector state dropped however a request ends."""
from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

import engines
import pytest
import torch

from kvtier.engine.config import EngineConfig
from kvtier.engine.core.kv_cache import KVCacheManager, build_kv_cache_groups
from kvtier.engine.core.kv_cache.single_type_manager import SlidingWindowManager
from kvtier.engine.core.request import Request, RequestStatus
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.core.scheduler import Scheduler
from kvtier.engine.entrypoints.llm import LLM
from kvtier.engine.llm_engine import LLMEngine

from hf_reference import hf_greedy
from kv_invariants import PageWitness
from tiny_models import save_tiny

sys.path.insert(0, str(Path(__file__).parent / "examples"))

WINDOW = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

def make_llm(loaded, ktc=None, **kw) -> LLM:
    engine = LLMEngine(EngineConfig(kv_transfer_config=ktc, **kw), loaded=loaded)
    engines.track(engine)
    return LLM.from_engine(engine)


def offloading(cpu_bytes=200_000_000, block_size=64, secondary=None, **extra) -> dict:
    cfg = {"cpu_bytes_to_use": cpu_bytes, "block_size": block_size, **extra}
    if secondary:
        cfg.update(spec_name="TieringOffloadingSpec", secondary_tiers=secondary)
    return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": cfg}


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, default_model):
    """A tiny Qwen2 with sliding and full layers, and HF transformers on the same weights."""
    return save_tiny("qwen2-hybrid", tmp_path_factory.mktemp("hybrid"), default_model.tokenizer, window=WINDOW)


# -- 1. hybrid models through the tiers ---------------------------------------

def test_hybrid_hit_from_the_cpu_tier_then_a_shorter_shared_prefix_equals_hf(hybrid):
    """The reported wrong output: A from the tier, then B sharing a shorter prefix of A."""
    hf, loaded = hybrid
    a = random_prompt(600, 1)
    b = a[:300] + random_prompt(50, 2)
    others = [random_prompt(500, s) for s in (3, 4, 5)]
    llm = make_llm(loaded, offloading(), num_gpu_blocks_override=120, max_num_batched_tokens=256)
    witness = PageWitness(llm.engine)
    assert tokens(llm.generate([a], GREEDY, use_tqdm=False)) == [hf_greedy(hf, a, 8)]
    for p in others:  # push A out of the device pool
        llm.generate([p], GREEDY, use_tqdm=False)
    assert llm.engine.connector.store.flush(60)
    again = llm.generate([a], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 512  # it came from the tier
    assert again.outputs[0].token_ids == hf_greedy(hf, a, 8)
    assert tokens(llm.generate([b], GREEDY, use_tqdm=False)) == [hf_greedy(hf, b, 8)]
    assert witness.violations == []


@pytest.mark.timeout(120)
def test_a_pool_sized_for_the_hybrid_saving_never_stalls_on_a_tier_hit(hybrid):
    """The reported hang: a full-length table asked for in every group on the hit path."""
    hf, loaded = hybrid
    a = random_prompt(600, 11)
    others = [random_prompt(500, s) for s in (12, 13)]
    # 600 + 8 tokens need 38 full-attention blocks, but only the window and a
    # chunk in the sliding group: 60 blocks hold it, 76 would be all-full.
    llm = make_llm(loaded, offloading(), num_gpu_blocks_override=60, max_num_batched_tokens=256)
    witness = PageWitness(llm.engine)
    llm.generate([a], GREEDY, use_tqdm=False)
    for p in others:
        llm.generate([p], GREEDY, use_tqdm=False)
    assert llm.engine.connector.store.flush(60)
    again = llm.generate([a], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 512
    assert again.outputs[0].token_ids == hf_greedy(hf, a, 8)
    assert witness.violations == []


def test_on_a_tier_hit_sliding_groups_hold_null_blocks_before_their_window(hybrid):
    hf, loaded = hybrid
    a = random_prompt(400, 21)
    llm = make_llm(loaded, offloading(), num_gpu_blocks_override=200, max_num_batched_tokens=512)
    engine = llm.engine
    llm.generate([a], GREEDY, use_tqdm=False)
    assert engine.connector.store.flush(60)
    assert engine.kv_cache_manager.pool.reset_prefix_cache()
    engine.add_request("again", a, SamplingParams(temperature=0.0, max_tokens=1))
    tables = None
    while engine.has_unfinished_requests():
        engine.step()
        if "again" in engine.scheduler.loading:
            tables = engine.kv_cache_manager.block_ids("again")
    assert tables is not None, "the prompt did not load from the tier"
    boundary = 384  # 6 offload blocks of 64
    for group, table in zip(engine.groups, tables):
        if group.spec.name == "sliding":
            first = (boundary - WINDOW + 1) // engine.block_size
            assert table[:first] == [0] * first  # the null block: nothing was written there
            assert 0 not in table[first:]
        else:
            assert 0 not in table
    # Only what was loaded reached the prefix cache: no sliding-group block before the window.
    pool = engine.kv_cache_manager.pool
    sliding = next(g.index for g in engine.groups if g.spec.name == "sliding")
    hashes = Request("x", a, GREEDY, 8, engine.block_size).block_hashes
    cached = [i for i, h in enumerate(hashes) if pool.get_cached((sliding, h)) is not None]
    assert cached and min(cached) >= (boundary - WINDOW + 1) // engine.block_size


def test_blocks_needed_is_one_rule_and_matches_every_step():
    """Admission's worst case is the most any step of the request holds."""
    for window, bs, chunk in [(32, 16, 48), (100, 16, 8), (7, 4, 5), (64, 16, 2048), (1024, 16, 256)]:
        groups = build_kv_cache_groups(["sliding_attention"], window)
        kv = KVCacheManager(groups, 4096, bs)
        mgr = kv.managers[0]
        assert isinstance(mgr, SlidingWindowManager)
        for total in (1, 5, 20, 33, 150, 1500):
            worst = max(mgr.blocks_needed(c, min(c + chunk, total)) for c in range(total))
            assert mgr.max_blocks_needed(total, chunk) == worst, (window, bs, chunk, total)


def test_a_request_that_can_never_fit_ends_with_an_error_instead_of_spinning():
    groups = build_kv_cache_groups(["full_attention"], None)
    kv = KVCacheManager(groups, 5, 4)  # 4 usable blocks: 16 tokens
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    req = Request("big", list(range(3, 40)), GREEDY, 8, 4)  # 37 tokens: 10 blocks
    scheduler.add(req)
    out = scheduler.schedule()
    assert out.failed == [req] and req.status == RequestStatus.FINISHED_ERROR
    assert "KV cache blocks" in req.stop_reason
    assert not scheduler.has_unfinished()
    assert kv.pool.num_free_blocks == 4


# -- 2. load results in one hand-over ------------------------------------------

class LateFailureConnector:
    """A vLLM-style connector (the two-call API) whose loads land later: the
    first request of a batch loads whole and is reported at once; every other
    one loses its last block, and that failure is reported with the first
    request's completion, a step before its own. The race a hand-over in two
    calls allows."""

    @staticmethod
    def make():
        from dict_connector import DictConnector

        class Late(DictConnector):
            def __init__(self, config, layout):
                super().__init__(config, layout)
                self.pending = []  # (request id, its loads)
                self.errors_now, self.done_now, self.done_next = set(), set(), set()

            def get_num_new_matched_tokens(self, request, num_computed_tokens):
                tokens, _ = super().get_num_new_matched_tokens(request, num_computed_tokens)
                return tokens, tokens > 0  # asynchronous

            def update_state_after_alloc(self, request, block_ids, num_external_tokens):
                before = len(self.loads)
                super().update_state_after_alloc(request, block_ids, num_external_tokens)
                if num_external_tokens:
                    self.pending.append((request.request_id, self.loads[before:]))

            def start_load_kv(self, meta):
                for n, (rid, loads) in enumerate(self.pending):
                    keep = loads if n == 0 else loads[:-1]  # the others' last block never arrives
                    for block_id, page in keep:
                        self.kv_cache[block_id].copy_(page)
                    if n == 0:
                        self.done_now.add(rid)
                    else:
                        self.errors_now.add(loads[-1][0])
                        self.done_next.add(rid)
                self.pending = []

            def get_finished(self, finished_req_ids):
                done, self.done_now, self.done_next = self.done_now, self.done_next, set()
                return set(), done

            def get_block_ids_with_load_errors(self):
                errors, self.errors_now = self.errors_now, set()
                return errors

        return Late


def test_a_failure_reported_before_its_load_is_never_read_as_success(default_model):
    module = type(sys)("late_connector")
    module.Late = LateFailureConnector.make()
    sys.modules["late_connector"] = module
    ktc = {"kv_connector": "Late", "kv_role": "kv_both", "kv_connector_module_path": "late_connector"}
    prompts = [" ".join(f"Fact {i}-{s}: {i} times {s} is {i * s}." for i in range(40)) for s in (3, 7)]
    cold = tokens(make_llm(default_model).generate(prompts, GREEDY, use_tqdm=False))
    llm = make_llm(default_model, ktc)
    llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.kv_cache_manager.pool.reset_prefix_cache()
    llm.engine.connector.kv_cache.zero_()  # whatever a failed block holds now is wrong
    warm = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert tokens(warm) == cold
    full = [(len(o.prompt_token_ids) - 1) // 16 * 16 for o in warm]
    # One loaded whole; the other was served only the blocks before the one that failed.
    assert sorted(o.num_cached_tokens == f for o, f in zip(warm, full)) == [False, True]


# -- 3. a failed load restarts from a consistent table --------------------------

@pytest.mark.parametrize("where", ["middle", "first"])
def test_a_partly_failed_load_is_rebuilt_and_recomputes_only_what_is_missing(hybrid, tmp_path, where):
    hf, loaded = hybrid
    a = random_prompt(500, 31)
    root = tmp_path / "fs"
    ktc = offloading(secondary=[{"type": "fs", "path": str(root)}])
    first = make_llm(loaded, ktc, num_gpu_blocks_override=200)
    first.generate([a], GREEDY, use_tqdm=False)
    assert first.engine.connector.store.flush(60)
    hashes = Request("x", a, GREEDY, 8, first.engine.block_size).block_hashes
    full_group = next(g.index for g in first.engine.groups if g.spec.name == "full")
    victim = root / f"{first.engine.connector.blocks.key(full_group, hashes, 3 if where == 'middle' else 0)}.kvb"
    assert victim.is_file()
    data = bytearray(victim.read_bytes())
    data[-50] ^= 0xFF
    victim.write_bytes(bytes(data))
    second = make_llm(loaded, ktc, num_gpu_blocks_override=200)
    witness = PageWitness(second.engine)
    out = second.generate([a], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(hf, a, 8)
    assert out.num_cached_tokens < 448  # not all of it was served
    assert second.engine.stats().tiers["fs"]["corrupt_blocks"] == 1
    assert witness.violations == []
    # Served again: the damaged block is gone, the rest computed and stored once more.
    assert second.engine.connector.store.flush(60)
    assert tokens(second.generate([a], GREEDY, use_tqdm=False)) == [hf_greedy(hf, a, 8)]


# -- 4. no writer after release -------------------------------------------------

@pytest.mark.timeout(120)
def test_a_load_past_its_deadline_recomputes_and_never_lands_afterwards(default_model, redis_srv):
    import servers
    prompt = " ".join(f"Entry {i}: {i * 7 % 13} birds." for i in range(60))
    cold = tokens(make_llm(default_model).generate([prompt], GREEDY, use_tqdm=False))
    prefix = f"d{uuid.uuid4().hex[:8]}:"
    tier = {"type": "redis", "url": redis_srv.url, "key_prefix": prefix, "timeout_s": 30}
    writer = make_llm(default_model, offloading(secondary=[tier]))
    writer.generate([prompt], GREEDY, use_tqdm=False)
    assert writer.engine.connector.store.flush(60)
    proxy = servers.DelayingProxy(redis_srv.port, delay_s=3.0)
    try:
        slow = {**tier, "url": proxy.url}
        reader = make_llm(default_model, offloading(secondary=[slow], load_timeout_s=1.0))
        witness = PageWitness(reader.engine)
        out = reader.generate([prompt], GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == cold[0]
        assert out.num_cached_tokens == 0  # given up: nothing was served
        time.sleep(4.0)  # the late reply arrives now, and must not land
        assert witness.violations == []
        assert reader.engine.connector.store.flush(30)
        assert witness.violations == []
    finally:
        proxy.close()


def test_a_load_past_its_deadline_fails_under_the_fail_policy(default_model, redis_srv):
    import servers
    prompt = " ".join(f"Entry {i}: {i * 5 % 11} cats." for i in range(60))
    tier = {"type": "redis", "url": redis_srv.url, "key_prefix": f"f{uuid.uuid4().hex[:8]}:", "timeout_s": 30}
    writer = make_llm(default_model, offloading(secondary=[tier]))
    writer.generate([prompt], GREEDY, use_tqdm=False)
    assert writer.engine.connector.store.flush(60)
    proxy = servers.DelayingProxy(redis_srv.port, delay_s=3.0)
    try:
        ktc = offloading(secondary=[{**tier, "url": proxy.url}], load_timeout_s=1.0)
        ktc["kv_load_failure_policy"] = "fail"
        out = make_llm(default_model, ktc).generate([prompt], GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].finish_reason == "error" and "KV load failed" in out.error
    finally:
        proxy.close()


# -- 5. shared tiers survive a rolling upgrade -----------------------------------

def test_another_releases_objects_are_misses_and_stay(default_model, tmp_path):
    import struct

    from kvtier.kvstore.block_format import FORMAT_VERSION
    prompt = " ".join(f"Line {i}: {i % 7} dogs." for i in range(60))
    root = tmp_path / "shared"
    ktc = offloading(secondary=[{"type": "fs", "path": str(root)}])
    first = make_llm(default_model, ktc)
    cold = tokens(first.generate([prompt], GREEDY, use_tqdm=False))
    assert first.engine.connector.store.flush(60)
    files = list(root.rglob("*.kvb"))
    assert files and all(f"/v{FORMAT_VERSION}-" in str(p) for p in files)  # the version is in every name
    for path in files:  # a later release wrote these names with its own format
        data = path.read_bytes()
        path.write_bytes(data[:4] + struct.pack("<H", FORMAT_VERSION + 1) + data[6:])
    second = make_llm(default_model, ktc)
    out = second.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == cold[0] and out.num_cached_tokens == 0
    stats = second.engine.connector.store.stats()["fs"]
    assert stats["corrupt"] == 0 and stats["foreign"] > 0
    assert all(p.exists() for p in files)  # not ours to delete


# -- 6. the step loop never waits on a secondary tier -----------------------------

@pytest.mark.timeout(90)
def test_a_hung_tier_lookup_never_holds_other_requests(default_model):
    import servers
    server = servers.RedisServer().start()
    try:
        # The lookup deadline far past the busy request's 24 steps, even on a loaded machine
        # (0.4-1 s a step beside two other busy processes): the lookup must still be pending.
        ktc = offloading(secondary=[{"type": "redis", "url": server.url, "timeout_s": 120}], load_timeout_s=120)
        llm = make_llm(default_model, ktc)
        engine = llm.engine
        busy = " ".join(f"Note {i}." for i in range(30))
        engine.add_request("busy", busy, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
        engine.step()  # its lookup (a miss) ...
        while "busy" not in {r.request_id for r in engine.scheduler.running}:
            engine.step()
        server.pause()  # ... then Redis hangs: it answers nothing, its sockets stay open
        engine.add_request("stuck", " ".join(f"Other {i}." for i in range(40)), GREEDY)
        outputs = []
        while "busy" in engine.requests:
            outputs += engine.step()
        busy_out = [o for o in outputs if o.request_id == "busy"][-1]
        assert len(busy_out.outputs[0].token_ids) == 24  # it ran to the end ...
        stuck = engine.requests["stuck"].children[0]
        assert stuck.status == RequestStatus.WAITING and engine.scheduler.num_asking == 1  # ... while this waits
        server.resume()
        while engine.has_unfinished_requests():
            engine.step()
        assert stuck.is_finished and len(stuck.output_token_ids) == 8
    finally:
        server.close()


# -- 7. no client waits forever -----------------------------------------------------

def test_when_the_engine_thread_dies_every_request_ends_and_health_says_so(default_model):
    from kvtier.engine.entrypoints.async_engine import AsyncLLMEngine, EngineDeadError
    engine = LLMEngine(EngineConfig(), loaded=default_model)
    engines.track(engine)
    real_stats = engine.stats

    def stats_that_breaks():
        if any(r.output_token_ids for r in engine.scheduler.running):
            raise RuntimeError("a bug outside any step")
        return real_stats()

    engine.stats = stats_that_breaks
    served = AsyncLLMEngine(engine)

    async def ask(i):
        with pytest.raises(EngineDeadError):
            async for _ in served.generate("Count to ten:", SamplingParams(max_tokens=64, ignore_eos=True),
                                           f"r{i}"):
                pass

    async def main():
        await asyncio.wait_for(asyncio.gather(*(ask(i) for i in range(3))), timeout=60)
        assert not served.is_healthy()
        with pytest.raises(EngineDeadError):  # a new request is refused at once
            async for _ in served.generate("Hi", SamplingParams(max_tokens=2), "late"):
                pass

    asyncio.run(main())


def test_a_slow_reader_holds_one_merged_delta_not_a_queue(default_model):
    from kvtier.engine.entrypoints.async_engine import AsyncLLMEngine
    served = AsyncLLMEngine(LLMEngine(EngineConfig(), loaded=default_model))
    engines.track(served.engine)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    reference = make_llm(default_model).generate(["Once upon a time"], params, use_tqdm=False)[0].outputs[0]

    async def main():
        stream = served.generate("Once upon a time", params, "slow")
        first = await anext(stream)
        held = served._streams["slow"]
        while served.engine.has_unfinished_requests():  # the reader sleeps while every token is made
            await asyncio.sleep(0.05)
        pending = held._pending
        rest = [out async for out in stream]
        return first, pending, rest

    first, pending, rest = asyncio.run(main())
    assert pending is not None and pending.finished  # one output holds all the reader missed
    assert len(rest) == 1 and rest[0] is pending
    text = first.outputs[0].text + rest[0].outputs[0].text
    ids = first.outputs[0].token_ids + rest[0].outputs[0].token_ids
    assert ids == reference.token_ids and text == reference.text
    served.shutdown()


# -- 9. connector state dropped however a request ends ------------------------------

def test_connector_state_is_dropped_for_every_way_a_request_ends(default_model, tmp_path, redis_srv):
    import servers
    tier = {"type": "redis", "url": redis_srv.url, "key_prefix": f"s{uuid.uuid4().hex[:8]}:", "timeout_s": 30}
    prompts = [" ".join(f"Row {i}-{s}: {i * s % 17}." for i in range(50)) for s in range(6)]
    writer = make_llm(default_model, offloading(secondary=[tier]))
    writer.generate(prompts[:3], GREEDY, use_tqdm=False)
    assert writer.engine.connector.store.flush(60)
    proxy = servers.DelayingProxy(redis_srv.port, delay_s=2.0)
    try:
        ktc = offloading(secondary=[{**tier, "url": proxy.url}], load_timeout_s=1.0)
        ktc["kv_load_failure_policy"] = "fail"
        llm = make_llm(default_model, ktc)
        engine = llm.engine
        sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        engine.add_request("fails", prompts[0], sp)        # its load passes the deadline: fails
        engine.add_request("aborted-loading", prompts[1], sp)
        engine.add_request("aborted-waiting", prompts[3], sp)
        engine.add_request("finishes", prompts[4], sp)
        engine.add_request("aborted-running", prompts[5], SamplingParams(max_tokens=200, ignore_eos=True))
        seen_loading = False
        for _ in range(2000):
            if not engine.has_unfinished_requests():
                break
            engine.step()
            if "aborted-loading" in engine.scheduler.loading and not seen_loading:
                seen_loading = True
                engine.abort_request("aborted-loading")
                engine.abort_request("aborted-waiting")
            running = {r.request_id for r in engine.scheduler.running}
            if "aborted-running" in running and "aborted-running" in engine.requests:
                engine.abort_request("aborted-running")
        assert seen_loading and not engine.has_unfinished_requests()
        engine.step()  # the ended loads are reported
        c = engine.connector
        assert c.decisions == {} and c.saved_upto == {}
        assert c.lookups.num_pending == 0 and c._loads.num_in_flight == 0 and c._pending_loads == []
        assert engine.kv_cache_manager.pool.num_free_blocks == engine.num_blocks - 1
    finally:
        proxy.close()


# -- 8. CUDA paths ------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_pool_saves_and_loads_through_pinned_staging(default_model):
    llm = make_llm(default_model, offloading(), device="cuda", dtype="float32")
    prompt = " ".join(f"Fact {i}." for i in range(80))
    cold = tokens(llm.generate([prompt], GREEDY, use_tqdm=False))
    assert llm.engine.connector.store.flush(60)
    assert llm.engine.kv_cache_manager.pool.reset_prefix_cache()
    warm = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert warm.num_cached_tokens > 0 and warm.outputs[0].token_ids == cold[0]
    assert llm.engine.connector._staging.pin


def test_copies_name_the_pool_device_for_every_index():
    """What runs here of the CUDA path's construction: index tensors on the pool's device."""
    from kvtier.connectors.offloading.transfer import DeviceCopier
    pool = torch.arange(6 * 4, dtype=torch.float32).view(6, 2, 2)
    copier = DeviceCopier(pool)
    assert copier._ids([1, 2]).device == pool.device
    out = torch.empty(2, 2, 2)
    assert copier.gather([4, 1], out) is None and torch.equal(out, pool[[4, 1]])
    copier.scatter([0, 5], out, [1, 0])
    assert torch.equal(pool[0], out[1]) and torch.equal(pool[5], out[0])
