"""Differential fuzzing of reuse: a seeded workload through a connector, with
faults injected, against the same workload with no connector at all.

A seed picks everything: the tier (cpu, fs, redis, obj on moto's S3, the
kvtier store daemon, a MultiConnector), the offload block size (16-256 tokens), a device pool small
enough to force eviction and preemption, the token budget, and the requests:
prompts built from a few shared prefixes of random lengths plus random tails,
a cache_salt on some, n > 1 on some, different max_tokens, aborts at random
steps, arrivals spread over the run. Faults land at random steps: stored
objects corrupted or truncated, the tier stopped and restarted, reads slowed
past the load deadline, puts that fail half way, a worker queue of one.

The property, for every seed: each greedy output equals the no-connector
run's (an aborted one, a prefix of it); nothing hangs past a bound, nothing
crashes; no step reads a page nothing wrote, no block is published before it
is whole (tests/kv_invariants.py); cached_tokens never exceeds the prompt.

Used by tests/test_differential_fuzz.py (a fixed set of seeds) and by
benchmarks/fuzz_reuse.py (thousands, on demand).
"""
from __future__ import annotations

import random
import shutil
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from kv_invariants import ContentTruth, ContentWitness, PageWitness

TIERS = ("cpu", "fs", "redis", "obj", "store", "multi")
FAULTS = ("corrupt", "truncate", "tier_down", "slow_reads", "failing_puts")


@dataclass
class Arrival:
    request_id: str
    prompt: list[int]
    max_tokens: int
    n: int
    salt: str | None
    at_step: int
    abort_at: int | None  # steps after arrival


@dataclass
class Workload:
    seed: int
    tier: str
    offload_tokens: int
    num_blocks: int
    max_num_batched_tokens: int
    queue_depth: int
    arrivals: list[Arrival]
    faults: list[tuple[int, str]]  # (step, fault)
    fault_kinds: list[str] = field(default_factory=list)
    preemption_mode: str = "swap"
    scheduling_policy: str = "fcfs"
    priorities: dict[str, int] = field(default_factory=dict)  # request -> priority (scheduling_policy=priority)
    kv_cache_dtype: str = "auto"  # a 16-bit cache is compared with a no-connector run of the same dtype
    long_prefill_token_threshold: int = 0
    max_num_partial_prefills: int = 1
    max_long_partial_prefills: int = 1


def make_workload(seed: int, tier: str, block_size: int, vocab: int, blocks_needed, scale: float = 1.0) -> Workload:
    """`blocks_needed(tokens, chunk)`: the engine's own count for one request.
    `scale` < 1 keeps prompts short (the default model costs more per token than a tiny one)."""
    rng = random.Random(seed)
    offload = rng.choice([b for b in (16, 32, 48, 64, 96, 128, 192, 256) if b % block_size == 0])
    prefixes = [[rng.randrange(3, vocab) for _ in range(rng.randrange(16, int(600 * scale) + 17))]
                for _ in range(rng.randrange(1, 4))]
    arrivals, step = [], 0
    for i in range(rng.randrange(4, 11)):
        prefix = rng.choice(prefixes)
        cut = rng.randrange(0, len(prefix) + 1)
        tail = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, int(120 * scale) + 2))]
        prompt = prefix[:cut] + tail
        if arrivals and rng.random() < 0.3:  # a prompt seen before, the next turn of a chat, a repeat
            prompt = rng.choice(arrivals).prompt + (tail if rng.random() < 0.5 else [])
        step += rng.choice([0, 0, 1, 3, 8, 20])
        arrivals.append(Arrival(
            f"r{i}", prompt, rng.randrange(1, 25), rng.choice([1, 1, 1, 2]),
            rng.choice([None, None, None, "tenant-a", "tenant-b"]), step,
            rng.randrange(0, 15) if rng.random() < 0.15 else None))
    budget = rng.choice([64, 128, 256, 512])
    # Small pools: the largest request fits, the whole workload does not.
    largest = max(blocks_needed(len(a.prompt) + a.max_tokens, budget) for a in arrivals)
    blocks = largest + rng.choice([0, largest // 2, largest, 2 * largest]) + rng.randrange(0, 8)
    kinds = [k for k in FAULTS if rng.random() < 0.35]
    if tier == "cpu":
        kinds = []  # memory cannot rot; its faults are a tiny tier and a full queue
    faults = sorted((rng.randrange(0, step + 12), kind) for kind in kinds for _ in range(rng.randrange(1, 3)))
    wl = Workload(seed, tier, offload, blocks, budget, rng.choice([1, 4, 64]), arrivals, faults, kinds)
    # Drawn apart, so that adding these left every earlier seed's workload as it was.
    sched = random.Random(seed ^ 0x5CED)
    wl.preemption_mode = sched.choice(["swap", "swap", "swap", "recompute"])
    wl.scheduling_policy = sched.choice(["fcfs", "fcfs", "priority"])
    wl.priorities = {a.request_id: sched.randrange(0, 3) for a in arrivals}
    later = random.Random(seed ^ 0x10F6)  # the same again for what came after
    wl.kv_cache_dtype = later.choice(["auto", "auto", "auto", "float16", "bfloat16"])
    wl.long_prefill_token_threshold = later.choice([0, 0, 16, 48, 128])
    wl.max_num_partial_prefills = later.randint(1, 3)
    wl.max_long_partial_prefills = later.randint(1, wl.max_num_partial_prefills)
    return wl


class TierFaults:
    """Faults for one seed's secondary tier, on the real servers and files."""

    def __init__(self, kind: str, servers: dict, scratch: Path, rng: random.Random) -> None:
        self.kind, self.servers, self.rng = kind, servers, rng
        self.unique = uuid.uuid4().hex[:10]
        self.root = scratch / f"fs-{self.unique}"
        self.bucket = None
        self.proxy = None
        self.tiers: list = []  # the live tier objects, once the engine exists
        self.down = False

    def spec(self) -> dict:
        import servers as srv
        common = {"timeout_s": 5.0, "backoff_s": 0.2, "max_backoff_s": 1.0}
        if self.kind == "fs":
            return {"type": "fs", "path": str(self.root), **common}
        if self.kind == "redis":
            self.proxy = srv.DelayingProxy(self.servers["redis"].port, delay_s=0.0)
            return {"type": "redis", "url": self.proxy.url, "key_prefix": f"z{self.unique}:", **common}
        if self.kind == "store":  # the daemon's key namespace is the connector's: fresh per seed anyway
            daemon = self.servers["store"]
            self.proxy = srv.DelayingProxy(daemon.port, delay_s=0.0, commands=(b"\xa3get",))  # msgpack "get"
            return {**daemon.tier_spec(**common), "url": f"kvtier://{self.proxy.address}"}
        s3 = self.servers["s3"]
        self.bucket = s3.create_bucket(f"fz-{self.unique}")
        self.proxy = srv.DelayingProxy(s3.port, delay_s=0.0, commands=(b"GET ",))
        spec = s3.tier_spec(self.bucket, **common)
        spec["endpoint_override"] = self.proxy.address
        return spec

    def attach(self, engine) -> None:
        connector = engine.connector
        for c in getattr(connector, "connectors", [connector]):
            self.tiers += [t for name, t in c.store.tiers.items() if name != "cpu"]
        for tier in self.tiers:  # what was stored, to damage later (redis and obj keep no index)
            tier.written = []
            store = tier.store

            def recording(keys, blocks, store=store, tier=tier):
                tier.written.extend(keys)
                return store(keys, blocks)

            tier.store = recording

    def apply(self, fault: str) -> None:
        getattr(self, fault)()

    def _stored(self, tier) -> list[str]:
        index = getattr(tier, "_index", None)
        if index is not None:
            with tier._lock:
                return list(index._sizes)
        return list(getattr(tier, "written", ()))

    def _rewrite(self, damage) -> None:
        import torch
        for tier in self.tiers:
            keys = self._stored(tier)
            for key in self.rng.sample(keys, min(len(keys), 3)):
                block = torch.randn(tier.block_shape).to(tier.dtype)
                data = b"".join(bytes(memoryview(part)) for part in tier.codec.encode(key, block))
                try:
                    tier.backend.delete([key])  # the store daemon keeps the first object put under a key
                    tier.backend.write([key], [[damage(data)]])
                except Exception:
                    pass  # the tier is down: nothing to damage

    def corrupt(self) -> None:
        self._rewrite(lambda data: data[:-9] + bytes([data[-9] ^ 0x55]) + data[-8:])

    def truncate(self) -> None:
        self._rewrite(lambda data: data[:len(data) // 2])

    def tier_down(self) -> None:
        if self.down:
            return
        self.down = True
        if self.kind == "fs":
            away = self.root.with_name(self.root.name + ".away")
            if self.root.exists() and not away.exists():
                self.root.rename(away)
        elif self.kind == "redis":
            self.servers["redis"].stop()
        elif self.kind == "store":
            self.servers["store"].kill()  # as a crash would
        else:
            self.servers["s3"].stop()

    def tier_up(self) -> None:
        if not self.down:
            return
        self.down = False
        if self.kind == "fs":
            away = self.root.with_name(self.root.name + ".away")
            for _ in range(100):  # the tier's writers may recreate files between the two calls
                if not away.exists():
                    break
                shutil.rmtree(self.root, ignore_errors=True)  # what was written while it was away is lost
                try:
                    away.rename(self.root)
                except OSError:
                    continue
        elif self.kind in ("redis", "store"):
            self.servers[self.kind].start()  # empty again: neither keeps anything on disk here
        else:
            self.servers["s3"].start()
            self.servers["s3"].create_bucket(self.bucket)  # an emulator restarted empty

    def slow_reads(self) -> None:
        if self.proxy is not None:
            self.proxy.delay_s = 1.5  # past the 1 s load deadline
        else:  # fs: reads that take their time
            for tier in self.tiers:
                read = tier.backend.read
                tier.backend.read = lambda names, sink, read=read: (time.sleep(1.5), read(names, sink))[1]

    def fast_reads(self) -> None:
        if self.proxy is not None:
            self.proxy.delay_s = 0.0
        for tier in self.tiers:
            tier.backend.__dict__.pop("read", None)

    def failing_puts(self) -> None:
        for tier in self.tiers:
            write = type(tier.backend).write.__get__(tier.backend)

            def half(names, parts, write=write):
                parts = [parts[i] for i in range(len(parts))]
                cut = len(names) // 2
                errors = write(names[:cut], parts[:cut]) if cut else []
                return errors + [OSError("the put failed half way")] * (len(names) - cut)

            tier.backend.write = half

    def working_puts(self) -> None:
        for tier in self.tiers:
            tier.backend.__dict__.pop("write", None)

    def heal(self) -> None:
        """Back to a working tier (the end of a fault's window)."""
        self.tier_up()
        self.fast_reads()
        self.working_puts()

    def close(self) -> None:
        self.heal()
        if self.proxy is not None:
            self.proxy.close()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.root.with_name(self.root.name + ".away"), ignore_errors=True)


def connector_config(wl: Workload, secondary: dict | None) -> dict:
    def offloading(tiers, cpu_blocks):
        cfg = {"num_cpu_blocks": cpu_blocks, "block_size": wl.offload_tokens, "load_timeout_s": 1.0}
        if tiers:
            cfg.update(spec_name="TieringOffloadingSpec",
                       secondary_tiers=[{**t, "queue_depth": wl.queue_depth} for t in tiers])
        return cfg

    rng = random.Random(wl.seed + 1)
    cpu_blocks = rng.choice([1, 2, 8, 64])  # a tiny CPU tier evicts between lookup and load
    if wl.tier == "multi":
        parts = [{"kv_connector": "OffloadingConnector", "kv_connector_extra_config": offloading([], cpu_blocks)},
                 {"kv_connector": "OffloadingConnector", "kv_connector_extra_config": offloading([secondary], 64)}]
        return {"kv_connector": "MultiConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"connectors": parts}}
    return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": offloading([secondary] if secondary else [], cpu_blocks)}


class FuzzFailure(AssertionError):
    pass


def _drive(engine, wl: Workload, on_step=None, max_steps: int = 20000, max_seconds: float = 600.0):
    """Run the workload's arrivals (and aborts, and faults via on_step); the final output per request."""
    from kvtier.engine.core.sampling_params import SamplingParams
    arrivals = sorted(wl.arrivals, key=lambda a: a.at_step)
    finals, aborts, aborted = {}, {}, set()
    step, started = 0, time.monotonic()
    while arrivals or engine.has_unfinished_requests():
        while arrivals and arrivals[0].at_step <= step:
            a = arrivals.pop(0)
            params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, n=a.n, ignore_eos=True)
            engine.add_request(a.request_id, a.prompt, params, cache_salt=a.salt,
                               priority=wl.priorities.get(a.request_id, 0))
            if a.abort_at is not None:
                aborts[a.request_id] = step + a.abort_at
        for rid, when in list(aborts.items()):
            if when <= step:
                if rid in engine.requests:
                    aborted.add(rid)
                engine.abort_request(rid)
                del aborts[rid]
        if on_step is not None:
            on_step(step)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        step += 1
        if step > max_steps or time.monotonic() - started > max_seconds:
            raise FuzzFailure(f"seed {wl.seed}: not done after {step} steps / {time.monotonic() - started:.0f} s; "
                              f"unfinished: {sorted(engine.requests)}")
    return finals, aborted


def run_seed(seed: int, model, tier: str, servers: dict, scratch: Path, reference_cache: dict,
             hf_model=None, scale: float = 1.0) -> dict:
    """One seed end to end; raises FuzzFailure with what differed. Returns a summary.
    With a secondary tier the workload runs twice: then on a fresh engine
    sharing the tier (a replica, or a restart), where the hits come from below."""
    from kvtier.engine.core.kv_cache import KVCacheManager, build_kv_cache_groups
    block_size = 16
    counter = KVCacheManager(build_kv_cache_groups(model.config.layer_types, model.config.sliding_window), 2,
                             block_size)
    wl = make_workload(seed, tier, block_size, model.config.vocab_size, counter.max_blocks_needed, scale)
    rng = random.Random(seed + 2)
    faults = TierFaults("obj" if tier == "obj" else ("fs" if tier == "multi" else tier), servers, scratch, rng) \
        if tier != "cpu" else None
    expected = reference(model, wl, reference_cache)
    summary = {"seed": seed, "tier": tier, "requests": len(wl.arrivals), "faults": wl.fault_kinds,
               "mode": f"{wl.preemption_mode}/{wl.scheduling_policy}/kv {wl.kv_cache_dtype}/long "
                       f"{wl.long_prefill_token_threshold or 'off'}",
               "preemptions": 0, "swapped_out_blocks": 0, "failed_loads": 0, "cached_tokens": 0, "tier_hit_tokens": {},
               "near_ties": []}  # the step of each request's first near tie
    with ExitStack() as stack:
        if faults is not None:
            stack.callback(faults.close)
        ktc = connector_config(wl, faults.spec() if faults else None)
        truth: list[ContentTruth] = []  # what was computed, for every phase (made with the first engine)
        for phase in range(1 if faults is None else 2):
            problems = _run_phase(wl, model, ktc, faults, rng, expected, summary, truth)
            if problems:
                raise FuzzFailure(f"seed {seed} ({tier}, offload {wl.offload_tokens}, {wl.num_blocks} blocks, "
                                  f"faults {wl.fault_kinds}, phase {phase + 1}):\n  " + "\n  ".join(problems[:10]))
    if hf_model is not None and wl.kv_cache_dtype == "auto":  # a 16-bit cache is not HF's arithmetic
        from hf_reference import hf_greedy
        a = random.Random(seed + 3).choice(wl.arrivals)
        want = hf_greedy(hf_model, a.prompt, a.max_tokens)
        # HF's generate stops at EOS; the workload ignores it: equal up to there.
        stopped = len(want) < a.max_tokens and want[-1:] == [model.tokenizer.eos_token_id]
        if want != expected[a.request_id].tokens[:a.max_tokens][:len(want) if stopped else None]:
            raise FuzzFailure(f"seed {seed}: {a.request_id}: the no-connector run differs from HF transformers")
    return summary


def _run_phase(wl: Workload, model, ktc: dict, faults: TierFaults | None, rng: random.Random,
               expected: dict, summary: dict, truth: list) -> list[str]:
    from kvtier.engine.config import EngineConfig
    from kvtier.engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(kv_transfer_config=ktc, num_gpu_blocks_override=wl.num_blocks,
                                    max_num_batched_tokens=wl.max_num_batched_tokens, block_size=16,
                                    max_model_len=4096, preemption_mode=wl.preemption_mode,
                                    scheduling_policy=wl.scheduling_policy, kv_cache_dtype=wl.kv_cache_dtype,
                                    long_prefill_token_threshold=wl.long_prefill_token_threshold,
                                    max_num_partial_prefills=wl.max_num_partial_prefills,
                                    max_long_partial_prefills=wl.max_long_partial_prefills), loaded=model)
    try:
        witness = PageWitness(engine)
        if not truth:
            truth.append(ContentTruth(engine.runner.kv_cache.dtype))
        content = ContentWitness(engine, truth[0])
        if faults is not None:
            faults.tiers = []
            faults.attach(engine)
        schedule = list(wl.faults)
        healing: list[int] = []

        def on_step(step: int) -> None:
            while schedule and schedule[0][0] <= step:
                faults.apply(schedule.pop(0)[1])
                healing.append(step + rng.randrange(2, 30))
            for when in [h for h in healing if h <= step]:
                healing.remove(when)
                faults.heal()

        try:
            got, aborted = _drive(engine, wl, on_step if faults else None)
        except FuzzFailure:
            raise
        except Exception as error:
            raise FuzzFailure(f"seed {wl.seed}: crashed: {error!r}") from error
        if faults is not None:
            faults.heal()
            for c in getattr(engine.connector, "connectors", [engine.connector]):
                c.store.flush(30)  # what this phase stored is there for the next one
        tiers = engine.stats().tiers
    finally:
        engine.shutdown()
    summary["preemptions"] += engine.scheduler.num_preemptions_total
    summary["swapped_out_blocks"] += engine.scheduler.num_swapped_out_blocks_total
    summary["failed_loads"] += engine.scheduler.num_failed_loads_total
    summary["cached_tokens"] += sum(out.num_cached_tokens for out in got.values())
    for name, t in tiers.items():
        if t["hit_tokens"]:
            summary["tier_hit_tokens"][name] = summary["tier_hit_tokens"].get(name, 0) + int(t["hit_tokens"])
    problems = list(witness.violations) + content.violations
    for a in wl.arrivals:
        out = got.get(a.request_id)
        if out is None:
            if a.request_id not in aborted:  # an abort ends a request without a last output
                problems.append(f"{a.request_id}: no final output")
            continue
        if out.num_cached_tokens > len(a.prompt) - 1:
            problems.append(f"{a.request_id}: cached_tokens {out.num_cached_tokens} of a {len(a.prompt)}-token prompt")
        ref = expected[a.request_id]
        want = ref.tokens[:a.max_tokens]
        tie = ref.near_tie(wl.kv_cache_dtype, a.max_tokens)
        if tie < a.max_tokens:
            summary["near_ties"].append(tie)
        where = f" (compared up to a near tie at step {tie})" if tie < a.max_tokens else ""
        for choice in out.outputs:
            ids = list(choice.token_ids)
            if choice.finish_reason == "abort":
                if len(ids) > a.max_tokens or not ref.matches(ids, wl.kv_cache_dtype, a.max_tokens):
                    problems.append(f"{a.request_id}[{choice.index}] aborted: {ids} not a prefix of {want}{where}")
            elif choice.finish_reason == "length":
                if len(ids) != a.max_tokens or not ref.matches(ids, wl.kv_cache_dtype, a.max_tokens):
                    problems.append(f"{a.request_id}[{choice.index}]: {ids} != {want}{where}")
            else:
                problems.append(f"{a.request_id}[{choice.index}] ended with {choice.finish_reason}: {out.error}")
    return problems


# A 16-bit cache rounds each K/V element: when a different chunking moves a
# value by one float32 ulp across a rounding boundary, the stored element moves
# by one 16-bit ulp, and logits by ~1e-3 (seen: seed 1791, -4.5606 vs -4.5615).
# Past a greedy step whose top two are closer than this, two correct runs of
# the same engine may part ways, so a 16-bit comparison stops there. float32
# (HF's arithmetic) is compared up to a tie within its own rounding: the
# GEMMs of a prompt chunked otherwise (a hit, a preemption) round differently
# by ulps, and seed 94035 met two tokens 2e-6 apart in logprob (283 and 744,
# the default model, step 1): the run without a connector took one, a run
# with a hit the other, every page read checked equal by the content witness.
NEAR_TIE = {"auto": 1e-4, "float32": 1e-4, "float16": 0.005, "bfloat16": 0.03}  # bf16's ulp is 8x fp16's


@dataclass
class Expected:
    tokens: list[int]
    top2: list[tuple[int, ...]]  # the two likeliest tokens at each greedy step
    margins: list[float]         # and how far apart their logprobs were

    def near_tie(self, dtype: str, max_tokens: int) -> int:
        """The first step where two correct runs of this dtype may part ways
        (max_tokens if none)."""
        tie = NEAR_TIE[dtype]
        return next((i for i, m in enumerate(self.margins[:max_tokens]) if m < tie), max_tokens)

    def matches(self, ids: list[int], dtype: str, max_tokens: int) -> bool:
        """Equal before the near tie; at it, one of the two near-equal tokens;
        after it, anything (a prefix of that length for an aborted request)."""
        tie = self.near_tie(dtype, max_tokens)
        head = min(len(ids), tie)
        if ids[:head] != self.tokens[:head]:
            return False
        return len(ids) <= tie or ids[tie] in self.top2[tie]


def reference(model, wl: Workload, cache: dict) -> dict[str, Expected]:
    """The no-connector greedy output of every prompt (cached across seeds).
    One bounded reference engine per (model, dtype): replacing engines as seeds
    alternate dtypes left the old pools to the garbage collector, and a long
    run's memory grew by a pool per swap."""
    from kvtier.engine.config import EngineConfig
    from kvtier.engine.core.sampling_params import SamplingParams
    from kvtier.engine.llm_engine import LLMEngine

    def key(a: Arrival) -> tuple:
        return id(model), wl.kv_cache_dtype, tuple(a.prompt)
    todo = [a for a in wl.arrivals if key(a) not in cache or len(cache[key(a)].tokens) < a.max_tokens]
    if todo:
        engines = cache.setdefault("engines", {})
        engine = engines.get((id(model), wl.kv_cache_dtype))
        if engine is None:
            engine = engines[(id(model), wl.kv_cache_dtype)] = LLMEngine(EngineConfig(
                max_model_len=4096, kv_cache_dtype=wl.kv_cache_dtype, cpu_kv_cache_bytes=256 << 20), loaded=model)
        for i, a in enumerate(todo):
            engine.add_request(f"ref{i}", a.prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                                   logprobs=2))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    choice = out.outputs[0]
                    top = [sorted(step.items(), key=lambda kv: -kv[1])[:2] for step in choice.logprobs]
                    cache[key(todo[int(out.request_id[3:])])] = Expected(
                        list(choice.token_ids), [tuple(t for t, _ in two) for two in top],
                        [two[0][1] - two[1][1] if len(two) > 1 else float("inf") for two in top])
    return {a.request_id: cache[key(a)] for a in wl.arrivals}
