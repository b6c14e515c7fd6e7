"""The OffloadingConnector end to end: TTFT served from each tier, and a multi-turn chat.

    python -m benchmarks.bench_connectors [--quick]

1. TTFT (wall time of generate(max_tokens=1)) of 2048- and 4096-token prompts
   (random token ids 100..40000, a new prompt for every measurement) whose KV
   comes from the cpu, fs, obj (moto S3), redis or store (daemon) tier, with the device prefix
   cache holding none of it; against cold recompute of a prompt of the same
   length on the same engine configuration, in the same run.
     cpu:   one engine; cold prompt, flush, drop the device prefix cache, again.
     other: a writer engine (CPU tier + that tier) computes the prompt cold
            (that is the cold time), its stores are flushed, then a second
            engine of the same configuration (empty device pool and CPU tier,
            same directory / bucket / Redis: a replica, or a restart) runs it.
   Every hit is checked: num_cached_tokens covers all but the last offload
   block, the tier's bytes_out grew by the blocks served and, for a secondary
   tier, the CPU tier served nothing. The connector never loads the offload
   block holding the last prompt token, so with the default 256-token block a
   hit still recomputes 256 tokens; --offload-block 16 shows the tiers without
   that floor. A 4096-token cold run prefills in two 2048-token steps: the first
   step's blocks are written to the secondary tier while the second computes.
   Each hit is also held to its floor: the tier's own transport moving the
   bytes it served as one object (raw memcpy, file read, redis-py GET, boto3
   get_object, pyzmq reply; benchmarks/raw_floors.py), plus a device prefix
   hit of the same prompt, measured right after.
2. A multi-turn chat over a document: 8 conversations x 9 turns (--convs,
   --turns). Each conversation opens with its own 1024-token document (a system
   prompt plus a retrieved document); a turn is 64 new user tokens (random ids)
   appended to the history, then a 32-token greedy reply (ignore_eos, so every
   configuration sees the same token counts) that joins the history. Offload
   blocks are 16 tokens here (--chat-offload-block), the engine's block: a turn
   recomputes its user tokens plus what follows the history's last whole
   offload block. Turn 1 reads a document no configuration has seen, so its
   TTFT is the same for all; the table also shows turns 2 and later on their
   own. vLLM's multi-turn offloading benchmark (benchmarks/multi_turn) runs
   conversations of 12-18 messages over a ~1000-token per-conversation prefix:
   with 16 x 6 (--convs 16 --turns 6) turn 1 is a sixth of all requests and
   alone keeps the all-turn mean near a quarter of no connector's. The earlier
   shape, 150 user + 16 reply tokens and no document, is --doc-tokens 0
   --user-tokens 150 --reply-tokens 16.
   By default turns go round robin (conversation 0..N-1 of turn 1, then of turn
   2, ...), one request at a time: each request's TTFT is the time from
   add_request to the engine step that returned its first token (the engine is
   stepped here, as LLM.generate does). The configurations (no connector,
   CPU-only offloading, CPU + fs; the CPU tier holds the whole working set in
   both) are one engine each, all alive at once and taking turns request by
   request; after each request its engine's background stores are waited for
   (counted in its total time, not in TTFT) so that one configuration's writes
   never slow another's. The device pool holds about a quarter of the working
   set, so without a connector most of a conversation's history is evicted
   before its next turn.
   --chat-clients N runs N users at once instead (each sends its next turn
   when its reply is complete; TTFT then includes waiting behind the other
   users' work), one configuration after another. On this CPU a step that
   carries another user's cold 1k-token prefill takes seconds, and a short
   follow-up scheduled in it waits that long: with 4 users, 8 x 3 turns and
   64-token offload blocks, offloading reached 0.62-0.68 of no connector's
   mean TTFT; with 16-token blocks and the long-prefill limits, 0.55 (the
   README has the table).

The servers (redis-server, moto) come from tests/servers.py and are started
and stopped here. Timings on a 2-core machine are sensitive to anything else
running: the load average at start and end is printed with the results. With
another busy process on the machine, torch's 2 OpenMP threads stall (a
150-token prefill measured 1.4-8 s against 0.5 s on 1 thread): run with
--threads 1 then.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/servers.py; tests/ is not a package

import torch  # noqa: E402

from benchmarks import raw_floors  # noqa: E402
from benchmarks.common import emit_json, median, percentile, print_table, ttft_boxes  # noqa: E402
from kvtier.engine.config import EngineConfig  # noqa: E402
from kvtier.engine.core.sampling_params import SamplingParams  # noqa: E402
from kvtier.engine.entrypoints.llm import LLM  # noqa: E402
from kvtier.engine.llm_engine import LLMEngine  # noqa: E402
from kvtier.engine.model.loader import load_model  # noqa: E402

import servers  # noqa: E402

TIERS = ("cpu", "fs", "obj", "redis", "store")
TTFT_TARGETS = {"cpu": 1 / 20, "fs": 1 / 10, "obj": 1 / 5, "redis": 1 / 5, "store": 1 / 10}  # tier TTFT / cold TTFT
CHAT_TARGET = 1 / 5  # mean TTFT with offloading / without
ONE = SamplingParams(temperature=0, max_tokens=1)


def random_prompt(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def offloading_config(cpu_bytes: int, secondary: list[dict], offload_block: int | None) -> dict:
    extra = {"spec_name": "TieringOffloadingSpec" if secondary else "CPUOffloadingSpec",
             "cpu_bytes_to_use": cpu_bytes, "secondary_tiers": secondary}
    if offload_block:
        extra["block_size"] = offload_block
    return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}


def make_llm(loaded, ktc: dict | None, **engine_kwargs) -> LLM:
    llm = LLM.from_engine(LLMEngine(EngineConfig(kv_transfer_config=ktc, **engine_kwargs), loaded=loaded))
    # First calls pay for allocator growth and kernel selection.
    llm.generate([random_prompt(64, random.Random(1))], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    return llm


def close_llm(llm: LLM) -> None:
    llm.engine.shutdown()  # the connector finishes queued stores and closes its connections


def flush(llm: LLM) -> None:
    if llm.engine.connector is not None and not llm.engine.connector.store.flush(120):
        raise RuntimeError("background stores did not finish within 120 s")


# -- 1. TTFT per tier ------------------------------------------------------

class TierCase:
    """A writer engine and the engine that reads back (the same one for cpu)."""

    def __init__(self, tier: str, spec: dict | None, loaded, args, engine_kwargs: dict) -> None:
        self.tier = tier
        ktc = offloading_config(args.cpu_bytes, [spec] if spec else [], args.offload_block)
        self.writer = make_llm(loaded, ktc, **engine_kwargs)
        self.reader = self.writer if tier == "cpu" else make_llm(loaded, ktc, **engine_kwargs)
        connector = self.reader.engine.connector
        self.offload_tokens = connector.offload_tokens
        self.block_bytes = connector.store.cpu.block_nbytes

    def measure(self, n: int, rng: random.Random) -> dict:
        p = random_prompt(n, rng)
        t = time.perf_counter()
        out = self.writer.generate([p], ONE, use_tqdm=False)[0]
        cold = time.perf_counter() - t
        assert out.num_cached_tokens == 0, f"the cold run found {out.num_cached_tokens} tokens cached"
        flush(self.writer)
        if self.reader is self.writer:
            assert self.writer.engine.kv_cache_manager.pool.reset_prefix_cache(), "device blocks still in use"
        before = self.reader.engine.stats().tiers
        t = time.perf_counter()
        out = self.reader.generate([p], ONE, use_tqdm=False)[0]
        hit = time.perf_counter() - t
        after = self.reader.engine.stats().tiers
        t = time.perf_counter()  # the same prompt again, its KV now in the device pool
        self.reader.generate([p], ONE, use_tqdm=False)
        device_hit = time.perf_counter() - t
        flush(self.reader)  # its own stores must not run into the next cold measurement
        cached = out.num_cached_tokens
        # Whole offload blocks only, and never the one holding the last prompt token
        # (OffloadingConnector.get_num_new_matched_tokens stops at (prompt - 1) // block).
        expect = (n - 1) // self.offload_tokens * self.offload_tokens
        assert cached >= expect, f"{self.tier}: {cached} of {n} tokens cached, expected {expect}"
        moved = {name: after[name]["bytes_out"] - before[name]["bytes_out"] for name in after}
        need = cached // self.offload_tokens * self.block_bytes
        assert moved[self.tier] >= need, f"{self.tier} served {moved[self.tier]} bytes, expected >= {need}"
        # A tier whose lookups read (obj) has its hit in the CPU tier by the time the load runs.
        if self.tier != "cpu" and not self.reader.engine.connector.store.tiers[self.tier].lookup_reads:
            assert moved["cpu"] == 0, f"the CPU tier served {moved['cpu']} bytes of a {self.tier} hit"
        return {"cold_s": cold, "hit_s": hit, "device_hit_s": device_hit, "cached_tokens": cached,
                "tier_bytes_out": moved[self.tier]}

    def close(self) -> None:
        close_llm(self.writer)
        if self.reader is not self.writer:
            close_llm(self.reader)


def bench_ttft(loaded, specs: dict, floors: dict, args, rng: random.Random) -> list[dict]:
    """Per tier and length: cold, the hit, and the hit's floor: the tier's raw
    transfer of the bytes it served (benchmarks/raw_floors.py) plus a device
    prefix hit of the same prompt (the step that is left once the KV is in)."""
    # A pool for one 4096-token request and then some; the same for every engine.
    engine_kwargs = {"num_gpu_blocks_override": args.ttft_pool_blocks}
    rows = []
    for tier in args.tiers:
        case = TierCase(tier, specs.get(tier), loaded, args, engine_kwargs)
        try:
            case.measure(512, rng)  # warm the whole path once: connections, threads, first files
            for n in args.lengths:
                reps = args.reps or (2 if n <= 2048 and not args.quick else 1)
                runs = [case.measure(n, rng) for _ in range(reps)]
                cold, hit = median([r["cold_s"] for r in runs]), median([r["hit_s"] for r in runs])
                device_hit = median([r["device_hit_s"] for r in runs])
                raw = floors[tier](runs[0]["tier_bytes_out"])
                rows.append({"tier": tier, "prompt_tokens": n, "cold_s": cold, "hit_s": hit, "ratio": hit / cold,
                             "device_hit_s": device_hit, "raw_transfer_s": raw, "floor_s": raw + device_hit,
                             "vs_floor": hit / (raw + device_hit),
                             "target": TTFT_TARGETS[tier], "met": hit / cold <= TTFT_TARGETS[tier],
                             "cached_tokens": runs[0]["cached_tokens"], "reps": reps,
                             "tier_mb_out": runs[0]["tier_bytes_out"] / 1e6,
                             "runs": runs})
                print(f"  ttft {tier} {n}: cold {cold:.3f}s hit {hit:.3f}s ratio {hit / cold:.4f}; device hit "
                      f"{device_hit:.3f}s raw transfer {raw:.3f}s: {hit / (raw + device_hit):.2f}x floor", flush=True)
        finally:
            case.close()
            del case
            gc.collect()
    return rows


# -- 2. multi-turn chat ----------------------------------------------------

_ids = itertools.count()


def timed_request(llm: LLM, prompt: list[int], params: SamplingParams):
    """One request alone: (TTFT, end-to-end time, its final output)."""
    engine = llm.engine
    rid = f"chat-{next(_ids)}"
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params)
    ttft = None
    while True:
        for out in engine.step():
            if out.request_id != rid:
                continue
            if ttft is None and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
            if out.finished:
                return ttft, time.perf_counter() - t0, out
        if not engine.has_unfinished_requests():
            raise RuntimeError("engine went idle with the request unfinished")


class ChatRun:
    """One configuration's engine and its copy of the conversations."""

    def __init__(self, name: str, llm: LLM, docs: list[list[int]]) -> None:
        self.name = name
        self.llm = llm
        self.history: list[list[int]] = [list(doc) for doc in docs]
        self.doc_tokens = len(docs[0]) if docs else 0
        self.ttfts: list[float] = []
        self.followup_ttfts: list[float] = []  # turns 2.. (turn 1's document is new to every configuration)
        self.busy_s = 0.0  # its requests end to end, plus waiting for its background stores
        self.store_wait_s = 0.0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.tiers_before = llm.engine.stats().tiers

    def record(self, c: int, prompt: list[int], user_len: int, ttft: float, out, params: SamplingParams) -> None:
        assert len(out.outputs[0].token_ids) == params.max_tokens, "a reply ended early"
        self.history[c] = prompt + list(out.outputs[0].token_ids)
        self.ttfts.append(ttft)
        if len(prompt) > user_len + self.doc_tokens:
            self.followup_ttfts.append(ttft)
        self.prompt_tokens += len(prompt)
        self.cached_tokens += out.num_cached_tokens

    def turn(self, c: int, user: list[int], params: SamplingParams) -> None:
        """One request alone (--chat-clients 1)."""
        prompt = self.history[c] + user
        ttft, e2e, out = timed_request(self.llm, prompt, params)
        self.record(c, prompt, len(user), ttft, out, params)
        # Let this engine's background stores finish before another engine runs,
        # so that no configuration is timed while another one's writes take the CPU.
        t = time.perf_counter()
        flush(self.llm)
        self.store_wait_s += time.perf_counter() - t
        self.busy_s += e2e + time.perf_counter() - t

    def serve(self, users: list[list[list[int]]], params: SamplingParams, clients: int) -> None:
        """The whole chat with `clients` users at once: client j holds conversations
        j, j + clients, ... and sends a conversation's next turn as soon as its
        reply is complete. TTFT runs from add_request to the step that returned
        the first token, so it includes waiting behind other requests' work."""
        engine = self.llm.engine
        todo = {j: [[c, 0] for c in range(j, len(users), clients)] for j in range(clients)}
        live: dict[str, tuple] = {}  # request id -> (client, conversation, prompt, user length, added at)
        first_token: dict[str, float] = {}

        def send(client: int) -> None:
            while todo[client] and todo[client][0][1] == len(users[todo[client][0][0]]):
                todo[client].pop(0)  # that conversation is over
            if todo[client]:
                c, turn = todo[client][0]
                todo[client][0][1] += 1
                rid = f"chat-{next(_ids)}"
                prompt = self.history[c] + users[c][turn]
                live[rid] = (client, c, prompt, len(users[c][turn]), time.perf_counter())
                engine.add_request(rid, prompt, params)

        started = time.perf_counter()
        for j in range(clients):
            send(j)
        while live:
            for out in engine.step():
                if out.request_id not in live:
                    continue
                client, c, prompt, user_len, added = live[out.request_id]
                if out.request_id not in first_token and out.outputs[0].token_ids:
                    first_token[out.request_id] = time.perf_counter() - added
                if out.finished:
                    del live[out.request_id]
                    self.record(c, prompt, user_len, first_token.pop(out.request_id), out, params)
                    send(client)
        t = time.perf_counter()
        flush(self.llm)
        self.store_wait_s = time.perf_counter() - t
        self.busy_s = time.perf_counter() - started

    def result(self) -> dict:
        after = self.llm.engine.stats().tiers
        return {"mean_ttft_s": sum(self.ttfts) / len(self.ttfts), "p90_ttft_s": percentile(self.ttfts, 90),
                "followup_mean_ttft_s": sum(self.followup_ttfts) / max(1, len(self.followup_ttfts)),
                "median_ttft_s": median(self.ttfts), "total_s": self.busy_s, "store_wait_s": self.store_wait_s,
                "requests": len(self.ttfts), "prompt_tokens": self.prompt_tokens, "ttfts": self.ttfts,
                "cached_tokens": self.cached_tokens, "cached_fraction": self.cached_tokens / self.prompt_tokens,
                "tier_mb_out": {t: (after[t]["bytes_out"] - self.tiers_before[t]["bytes_out"]) / 1e6 for t in after},
                "tier_mb_in": {t: (after[t]["bytes_in"] - self.tiers_before[t]["bytes_in"]) / 1e6 for t in after}}


def bench_chat(loaded, fs_dir: str, args) -> tuple[dict, dict]:
    working_set = args.convs * (args.doc_tokens + args.turns * (args.user_tokens + args.reply_tokens))
    pool_blocks = -(-working_set // (16 * 4))  # a quarter of it, in 16-token device blocks
    configs = {
        "no connector": None,
        "CPU offloading": offloading_config(args.chat_cpu_bytes, [], args.chat_offload_block),
        "CPU + fs": offloading_config(args.chat_cpu_bytes, [{"type": "fs", "path": fs_dir}], args.chat_offload_block),
    }
    rng = random.Random(1234)  # the same user turns for every configuration
    users = [[random_prompt(args.user_tokens, rng) for _ in range(args.turns)] for _ in range(args.convs)]
    docs = [random_prompt(args.doc_tokens, rng) for _ in range(args.convs)]
    params = SamplingParams(temperature=0, max_tokens=args.reply_tokens, ignore_eos=True)
    prefill_limits = {"long_prefill_token_threshold": args.long_prefill_token_threshold,
                      "max_num_partial_prefills": args.max_num_partial_prefills,
                      "max_long_partial_prefills": args.max_long_partial_prefills}
    runs: list[ChatRun] = []
    try:
        for name, ktc in configs.items():
            runs.append(ChatRun(name, make_llm(loaded, ktc, num_gpu_blocks_override=pool_blocks, block_size=16,
                                               **prefill_limits), docs))
        if args.chat_clients > 1:
            for r in runs:  # one configuration at a time, each with the machine to itself
                r.serve(users, params, args.chat_clients)
                print(f"  chat {r.name}: mean TTFT {sum(r.ttfts) / len(r.ttfts):.3f}s, "
                      f"total {r.busy_s:.1f}s", flush=True)
        else:
            # The configurations take turns request by request (starting with a different one
            # each time): a noisy neighbour on a 2-core machine then slows all of them alike.
            step = 0
            for turn in range(args.turns):
                for c in range(args.convs):
                    for i in range(len(runs)):
                        runs[(step + i) % len(runs)].turn(c, users[c][turn], params)
                    step += 1
                print(f"  chat turn {turn + 1}: " + ", ".join(
                    f"{r.name} mean TTFT {sum(r.ttfts) / len(r.ttfts):.3f}s" for r in runs), flush=True)
        results = {r.name: r.result() for r in runs}
    finally:
        for r in runs:
            close_llm(r.llm)
        runs.clear()
        gc.collect()
    setup = {"clients": args.chat_clients, "working_set_tokens": working_set, "offload_block": args.chat_offload_block, "pool_blocks": pool_blocks, "pool_tokens": pool_blocks * 16, **prefill_limits,
             "cpu_tier_bytes": args.chat_cpu_bytes}
    return results, setup


# -- main ------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2048 tokens only, 1 rep; 8 conversations x 3 turns")
    ap.add_argument("--reps", type=int, default=None,
                    help="measurements per tier and length, median taken (default: 2 at 2048 tokens, 1 at 4096)")
    ap.add_argument("--offload-block", type=int, default=None,
                    help="kv_connector_extra_config.block_size, tokens (default: the connector's, 256)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, one per core). On a machine shared with other busy "
                         "processes, 1 avoids OpenMP oversubscription stalls that make 2-thread timings erratic")
    ap.add_argument("--doc-tokens", type=int, default=1024,
                    help="chat: each conversation opens with a document of this many tokens (0: none)")
    ap.add_argument("--convs", type=int, default=8, help="chat: conversations")
    ap.add_argument("--turns", type=int, default=9, help="chat: user turns a conversation")
    ap.add_argument("--user-tokens", type=int, default=64, help="chat: new user tokens a turn")
    ap.add_argument("--reply-tokens", type=int, default=32, help="chat: reply tokens a turn")
    ap.add_argument("--chat-offload-block", type=int, default=16,
                    help="chat: kv_connector_extra_config.block_size, tokens (a turn recomputes what follows the "
                         "last whole offload block of its history)")
    ap.add_argument("--chat-clients", type=int, default=1,
                    help="chat: users at once, each sending its next turn when its reply is complete "
                         "(1: one request at a time, the configurations taking turns)")
    ap.add_argument("--long-prefill-token-threshold", type=int, default=0,
                    help="chat: the engine flag of that name, for every configuration (0: off)")
    ap.add_argument("--max-num-partial-prefills", type=int, default=1, help="chat: the engine flag")
    ap.add_argument("--max-long-partial-prefills", type=int, default=1, help="chat: the engine flag")
    ap.add_argument("--tiers", nargs="+", choices=TIERS, default=list(TIERS), help="TTFT: the tiers to measure")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--skip-chat", action="store_true")
    ap.add_argument("--out", default=None, help="write bench_connectors.json and .png here")
    args = ap.parse_args()
    print("$ python -m benchmarks.bench_connectors " + " ".join(sys.argv[1:]), flush=True)
    args.lengths = [2048] if args.quick else [2048, 4096]
    if args.quick:
        args.convs, args.turns = 8, 3
    args.cpu_bytes = 1_000_000_000  # holds 84 offload blocks: everything part 1 stores per engine
    args.chat_cpu_bytes = 1_500_000_000  # holds the whole chat working set (~0.75 GB)
    args.ttft_pool_blocks = 2 * (max(args.lengths) // 16) + 64
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} (1 min), torch threads {torch.get_num_threads()}", flush=True)
    torch.manual_seed(0)
    rng = random.Random(0)
    t_start = time.perf_counter()
    loaded = load_model(None)

    ttft, chat, chat_setup = [], {}, {}
    scratch = tempfile.mkdtemp(prefix="kvtier-bench-")
    try:
        with ExitStack() as stack:
            if not args.skip_ttft:
                fs_path = os.path.join(scratch, "ttft-fs")
                specs = {"fs": {"type": "fs", "path": fs_path}}
                floors = {"cpu": raw_floors.memcpy_s, "fs": lambda n: raw_floors.file_read_s(fs_path, n),
                          "store": raw_floors.zmq_reply_s}
                if "redis" in args.tiers:
                    url = stack.enter_context(servers.redis_server()).url
                    specs["redis"] = {"type": "redis", "url": url}
                    floors["redis"] = lambda n: raw_floors.redis_get_s(url, n)
                if "obj" in args.tiers:
                    s3 = stack.enter_context(servers.s3_server())
                    bucket = s3.create_bucket("kvtier-bench")
                    specs["obj"] = s3.tier_spec(bucket)
                    floors["obj"] = lambda n: raw_floors.s3_get_s(s3.client(), bucket, n)
                if "store" in args.tiers:  # the daemon as its own process: a fresh replica's hit
                    daemon = stack.enter_context(servers.store_daemon("--cpu-bytes", str(4 << 30)))
                    specs["store"] = daemon.tier_spec()
                ttft = bench_ttft(loaded, specs, floors, args, rng)
        if not args.skip_chat:
            chat, chat_setup = bench_chat(loaded, os.path.join(scratch, "chat-fs"), args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if ttft:
        print_table(f"TTFT with the device prefix cache evicted, KV from a tier vs cold recompute "
                    f"(seconds; offload block {args.offload_block or 256} tokens; torch threads {torch.get_num_threads()})",
                    ["tier", "prompt tokens", "reps (median)", "cached tokens", "cold", "from tier", "tier/cold",
                     "target", "met", "MB served", "raw transfer", "device hit", "from tier / (raw + device hit)",
                     "fs / cpu"],
                    [[r["tier"], r["prompt_tokens"], r["reps"], r["cached_tokens"], r["cold_s"], r["hit_s"], r["ratio"],
                      f"<= 1/{round(1 / r['target'])}", "yes" if r["met"] else "NO", r["tier_mb_out"],
                      r["raw_transfer_s"], r["device_hit_s"], r["vs_floor"], fs_vs_cpu(ttft, r)] for r in ttft])
    if chat:
        base = chat["no connector"]["mean_ttft_s"]
        print_table(f"Multi-turn chat: {args.convs} conversations x {args.turns} turns, "
                    + (f"{args.chat_clients} users at once" if args.chat_clients > 1 else "round robin, one request at a time")
                    + f" ({args.doc_tokens}-token document, then {args.user_tokens} user + {args.reply_tokens} reply "
                    f"tokens a turn; offload block {args.chat_offload_block} tokens; device pool "
                    f"{chat_setup['pool_tokens']} tokens = 1/4 of the {chat_setup['working_set_tokens']}-token "
                    f"working set). total = the configuration's requests end to end + waits for its stores"
                    + (" (wall time of the whole chat)" if args.chat_clients > 1 else "")
                    + (f"; long prefills: threshold {args.long_prefill_token_threshold}, "
                       f"{args.max_long_partial_prefills} of {args.max_num_partial_prefills} partial a step"
                       if args.long_prefill_token_threshold else ""),
                    ["config", "mean TTFT (s)", "p90 TTFT (s)", "total (s)", "of which store waits (s)",
                     "prompt tokens cached", "mean TTFT / no connector", "turns 2+: mean TTFT (s)",
                     "turns 2+: / no connector", "target (all turns)", "met"],
                    [[name, r["mean_ttft_s"], r["p90_ttft_s"], r["total_s"], r["store_wait_s"],
                      f"{r['cached_fraction']:.1%}", r["mean_ttft_s"] / base, r["followup_mean_ttft_s"],
                      r["followup_mean_ttft_s"] / chat["no connector"]["followup_mean_ttft_s"],
                      "" if name == "no connector" else f"<= 1/{round(1 / CHAT_TARGET)}",
                      "" if name == "no connector" else ("yes" if r["mean_ttft_s"] / base <= CHAT_TARGET else "NO")]
                     for name, r in chat.items()])
    load_end = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    print(f"\nload average at end: {load_end[0]:.2f} (1 min); wall time {elapsed:.0f} s")
    emit_json("bench_connectors", {
        "args": {k: v for k, v in vars(args).items()},
        "ttft": ttft,
        "chat": chat, "chat_setup": chat_setup,
        "chat_targets": {name: {"ratio": r["mean_ttft_s"] / chat["no connector"]["mean_ttft_s"], "target": CHAT_TARGET}
                         for name, r in chat.items() if name != "no connector"} if chat else {},
        "threads": torch.get_num_threads(), "loadavg_start": load_start[0], "loadavg_end": load_end[0],
        "wall_s": elapsed}, args.out, draw)


def fs_vs_cpu(rows: list[dict], row: dict) -> float | str:
    """An fs hit's TTFT over the CPU tier's at the same length (target: <= 1.3)."""
    cpu = [r["hit_s"] for r in rows if r["tier"] == "cpu" and r["prompt_tokens"] == row["prompt_tokens"]]
    return row["hit_s"] / cpu[0] if row["tier"] == "fs" and cpu else ""


def draw(payload: dict, plt):
    """TTFT per tier against cold, per prompt length; the chat's TTFT distributions."""
    panels = [p for p in ("ttft", "chat") if payload[p]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False, layout="constrained")
    for ax, panel in zip(axes[0], panels):
        if panel == "ttft":
            rows = payload["ttft"]
            lengths = sorted({r["prompt_tokens"] for r in rows})
            tiers = list(dict.fromkeys(r["tier"] for r in rows))
            bars = {"cold": [median([r["cold_s"] for r in rows if r["prompt_tokens"] == n]) for n in lengths]}
            for tier in tiers:
                bars[tier] = [next((r["hit_s"] for r in rows if r["tier"] == tier and r["prompt_tokens"] == n),
                                   float("nan")) for n in lengths]
            width = 0.8 / len(bars)
            for i, (name, ys) in enumerate(bars.items()):
                ax.bar([x + i * width for x in range(len(lengths))], ys, width, label=name)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(lengths))], [f"{n} tokens" for n in lengths])
            ax.set_yscale("log")
            ax.set_ylabel("TTFT (s, log scale)")
            ax.set_title(f"KV from each tier vs cold (offload block {payload['args']['offload_block'] or 256})")
            ax.legend(fontsize=8)
        else:
            ttft_boxes(ax, {name: r["ttfts"] for name, r in payload["chat"].items()},
                       f"multi-turn chat, {payload['chat_setup']['clients']} user(s) at once: TTFT")
    return fig


if __name__ == "__main__":
    main()
