"""Long-document QA and multi-turn RAG: the workloads kvtier exists for.

    python -m benchmarks.bench_workloads [--quick] [--configs cpu fs ...] [--out DIR]

(a) docqa, LMCache's long-document QA shape: --docs documents of --doc-tokens
    tokens each (random ids 100..40000). A warm-up round sends every document
    once (each with its first question), then the query round asks the
    remaining --questions - 1 questions of every document (--question-tokens random ids
    each, --answer-tokens greedy output tokens) in one shuffled order, the same
    for every configuration. The device pool holds about a quarter of the
    documents, so without a connector most queries recompute their document.
    TTFT and total time are the query round's.
(b) rag, multi-turn retrieval-augmented chat: a corpus of --corpus documents
    of --rag-doc-tokens tokens; --convs conversations of --turns turns. A turn's
    prompt is a --system-tokens system prompt, 2-4 documents retrieved from the
    corpus (Zipf-popular: a few documents are retrieved often; a follow-up
    turn keeps its previous turn's documents half the time), the conversation
    so far, and the new user question; the reply joins the conversation. The
    device pool holds about a quarter of the corpus.

Requests go one at a time (each request's TTFT: add_request to the step that
returned its first token); after each request the configuration's background
stores are waited for (in its total time, not in TTFT), so no configuration is
timed while another one's writes take the CPU. Configurations take turns
request by request: a noisy neighbour slows all of them alike.

Configurations (offload blocks of --offload-block tokens, 16 by default: a hit
then recomputes only the part of the prompt past its last whole 16 tokens):
  none   no connector
  cpu    the OffloadingConnector's CPU tier, holding the whole working set
  fs, redis, obj, store:  a CPU tier holding about a quarter of the working
         set, in front of that tier (a local directory, redis-server, moto's
         S3 server, the kvtier store daemon): most hits come from below.
Every configuration's outputs are checked equal to no connector's.

--out DIR writes bench_workloads.json and bench_workloads.png (the TTFT
distributions per configuration; matplotlib, the `plots` extra).
"""
from __future__ import annotations

import argparse
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

from benchmarks.bench_connectors import close_llm, flush, make_llm, offloading_config, random_prompt, timed_request  # noqa: E402
from benchmarks.common import emit_json, percentile, print_table, return_freed_memory, ttft_boxes  # noqa: E402
from kvtier.engine.core.sampling_params import SamplingParams  # noqa: E402
from kvtier.engine.model.loader import load_model  # noqa: E402

import servers  # noqa: E402

CONFIGS = ("none", "cpu", "fs", "redis", "obj", "store")
LABELS = {"none": "no connector", "cpu": "CPU", "fs": "CPU + fs", "redis": "CPU + Redis", "obj": "CPU + S3",
          "store": "store daemon"}
DOCQA_TARGET = 0.1  # mean TTFT / no connector's


# -- the two workloads, as lists of prompts ---------------------------------

def docqa_requests(args, rng: random.Random) -> tuple[list[list[int]], list[list[int]]]:
    """(warm-up prompts, query prompts)."""
    docs = [random_prompt(args.doc_tokens, rng) for _ in range(args.docs)]
    questions = [[random_prompt(args.question_tokens, rng) for _ in range(args.questions)] for _ in docs]
    warmup = [doc + qs[0] for doc, qs in zip(docs, questions)]
    queries = [doc + q for doc, qs in zip(docs, questions) for q in qs[1:]]
    rng.shuffle(queries)
    return warmup, queries


class RagWorkload:
    """The turn plan of every conversation; the prompts depend on the replies,
    so each configuration builds its own from its own outputs (checked equal)."""

    def __init__(self, args, rng: random.Random) -> None:
        self.system = random_prompt(args.system_tokens, rng)
        self.corpus = [random_prompt(args.rag_doc_tokens, rng) for _ in range(args.corpus)]
        weights = [1 / (rank + 1) for rank in range(args.corpus)]  # Zipf: popular documents come back
        self.turns: list[list[tuple[list[int], list[int]]]] = []  # per conversation: (doc ids, question)
        for _ in range(args.convs):
            plan, docs = [], None
            for _ in range(args.turns):
                if docs is None or rng.random() < 0.5:
                    docs = []
                    while len(docs) < rng.randint(2, 4):
                        d = rng.choices(range(args.corpus), weights)[0]
                        if d not in docs:
                            docs.append(d)
                plan.append((list(docs), random_prompt(args.question_tokens, rng)))
            self.turns.append(plan)

    def prompt(self, conv: int, turn: int, history: list[int]) -> list[int]:
        docs, question = self.turns[conv][turn]
        return self.system + [t for d in docs for t in self.corpus[d]] + history + question

    def order(self) -> list[tuple[int, int]]:
        """Round robin over conversations, turn by turn."""
        return [(c, t) for t in range(len(self.turns[0])) for c in range(len(self.turns))]


# -- one configuration -------------------------------------------------------

class Config:
    def __init__(self, name: str, llm) -> None:
        self.name, self.llm = name, llm
        self.ttfts: list[float] = []
        self.busy_s = 0.0
        self.cached = self.prompt_tokens = 0
        self.outputs: list[list[int]] = []

    def ask(self, prompt: list[int], params: SamplingParams, timed: bool = True) -> list[int]:
        ttft, e2e, out = timed_request(self.llm, prompt, params)
        t = time.perf_counter()
        flush(self.llm)
        if timed:
            self.ttfts.append(ttft)
            self.busy_s += e2e + time.perf_counter() - t
            self.cached += out.num_cached_tokens
            self.prompt_tokens += len(prompt)
        tokens = list(out.outputs[0].token_ids)
        self.outputs.append(tokens)
        return tokens

    def result(self) -> dict:
        return {"mean_ttft_s": sum(self.ttfts) / len(self.ttfts), "p90_ttft_s": percentile(self.ttfts, 90),
                "median_ttft_s": percentile(self.ttfts, 50), "total_s": self.busy_s, "requests": len(self.ttfts),
                "cached_fraction": self.cached / max(1, self.prompt_tokens), "ttfts": self.ttfts}


def build_configs(names, loaded, specs: dict, working_set_tokens: int, pool_blocks: int, args) -> list[Config]:
    cfg = loaded.config
    kv_bytes_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # float32 K and V
    whole = working_set_tokens * kv_bytes_per_token * 5 // 4
    out = []
    for name in names:
        if name == "none":
            ktc = None
        elif name == "cpu":
            ktc = offloading_config(whole, [], args.offload_block)
        else:
            ktc = offloading_config(whole // 4, [specs[name]], args.offload_block)
        out.append(Config(name, make_llm(loaded, ktc, num_gpu_blocks_override=pool_blocks, block_size=16)))
    return out


def take_turns(configs: list[Config], requests: list, ask) -> None:
    """ask(config, request) for every request, the configurations in rotation."""
    for i, request in enumerate(requests):
        for j in range(len(configs)):
            ask(configs[(i + j) % len(configs)], request)


def check_equal(configs: list[Config], workload: str) -> None:
    want = configs[0].outputs
    for c in configs[1:]:
        if c.outputs != want:
            bad = next(i for i, (a, b) in enumerate(zip(c.outputs, want)) if a != b)
            raise AssertionError(f"{workload}: {LABELS[c.name]}'s output {bad} differs from {LABELS[configs[0].name]}'s")


def bench_docqa(loaded, specs: dict, args) -> dict:
    warmup, queries = docqa_requests(args, random.Random(7))
    per_doc = args.doc_tokens + args.question_tokens + args.answer_tokens
    pool_blocks = max(-(-per_doc // 16) + 8, args.docs * args.doc_tokens // 4 // 16)
    params = SamplingParams(temperature=0, max_tokens=args.answer_tokens, ignore_eos=True)
    configs = build_configs(args.configs, loaded, specs, args.docs * per_doc, pool_blocks, args)
    try:
        take_turns(configs, warmup, lambda c, p: c.ask(p, params, timed=False))
        take_turns(configs, queries, lambda c, p: c.ask(p, params))
        check_equal(configs, "docqa")
        return {"results": {c.name: c.result() for c in configs},
                "setup": {"docs": args.docs, "doc_tokens": args.doc_tokens, "queries": len(queries),
                          "pool_tokens": pool_blocks * 16}}
    finally:
        for c in configs:
            close_llm(c.llm)
        configs.clear()
        return_freed_memory()


def bench_rag(loaded, specs: dict, args) -> dict:
    wl = RagWorkload(args, random.Random(8))
    corpus_tokens = args.corpus * args.rag_doc_tokens + args.system_tokens
    longest = args.system_tokens + 4 * args.rag_doc_tokens + args.turns * (args.question_tokens + args.answer_tokens)
    pool_blocks = max(-(-longest // 16) + 8, corpus_tokens // 4 // 16)
    params = SamplingParams(temperature=0, max_tokens=args.answer_tokens, ignore_eos=True)
    configs = build_configs(args.configs, loaded, specs, corpus_tokens + args.convs * longest, pool_blocks, args)
    history = {c.name: [[] for _ in range(args.convs)] for c in configs}

    def ask(config: Config, turn: tuple[int, int]) -> None:
        conv, t = turn
        past = history[config.name][conv]
        question = wl.turns[conv][t][1]
        reply = config.ask(wl.prompt(conv, t, past), params)
        past += question + reply

    try:
        take_turns(configs, wl.order(), ask)
        check_equal(configs, "rag")
        return {"results": {c.name: c.result() for c in configs},
                "setup": {"corpus": args.corpus, "doc_tokens": args.rag_doc_tokens, "convs": args.convs,
                          "turns": args.turns, "pool_tokens": pool_blocks * 16}}
    finally:
        for c in configs:
            close_llm(c.llm)
        configs.clear()
        return_freed_memory()


# -- report -----------------------------------------------------------------

def report(name: str, title: str, run: dict, target: float | None) -> None:
    results = run["results"]
    base = results["none"]["mean_ttft_s"] if "none" in results else None
    rows = []
    for config, r in results.items():
        ratio = r["mean_ttft_s"] / base if base else float("nan")
        met = "" if config == "none" or target is None or base is None else ("yes" if ratio <= target else "NO")
        rows.append([LABELS[config], r["mean_ttft_s"], r["p90_ttft_s"], r["total_s"], f"{r['cached_fraction']:.1%}",
                     ratio, met])
    print_table(f"{name}: {title}", ["config", "mean TTFT (s)", "p90 TTFT (s)", "total (s)", "prompt tokens cached",
                                     "mean TTFT / no connector", f"target <= {target}" if target else "target"], rows)


def draw(payload: dict, plt):
    parts = [(k, payload[k]) for k in ("docqa", "rag") if payload.get(k)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.2), squeeze=False, layout="constrained")
    for ax, (name, run) in zip(axes[0], parts):
        ttft_boxes(ax, {LABELS[c]: r["ttfts"] for c, r in run["results"].items()},
                   {"docqa": "long-document QA: query-round TTFT", "rag": "multi-turn RAG: TTFT"}[name])
    fig.suptitle(f"bench_workloads (default model, float32, offload block {payload['args']['offload_block']}, "
                 f"torch threads {payload['threads']})")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 documents x 2 questions; 4 conversations x 3 turns")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--workloads", nargs="+", choices=("docqa", "rag"), default=["docqa", "rag"])
    ap.add_argument("--offload-block", type=int, default=16, help="kv_connector_extra_config.block_size, tokens")
    ap.add_argument("--docs", type=int, default=12, help="docqa: documents")
    ap.add_argument("--doc-tokens", type=int, default=2048, help="docqa: tokens a document")
    ap.add_argument("--questions", type=int, default=3, help="docqa: questions a document (the first warms up)")
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--corpus", type=int, default=50, help="rag: documents in the corpus")
    ap.add_argument("--rag-doc-tokens", type=int, default=256)
    ap.add_argument("--system-tokens", type=int, default=128)
    ap.add_argument("--convs", type=int, default=6, help="rag: conversations")
    ap.add_argument("--turns", type=int, default=4, help="rag: turns a conversation")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    ap.add_argument("--out", default=None, help="write bench_workloads.json and .png here")
    args = ap.parse_args()
    if args.quick:
        args.docs, args.questions, args.convs, args.turns = 8, 2, 4, 3
    if "none" not in args.configs:
        args.configs.insert(0, "none")  # the baseline and the reference output
    args.configs = ["none"] + [c for c in args.configs if c != "none"]
    if args.threads:
        torch.set_num_threads(args.threads)
    print("$ python -m benchmarks.bench_workloads " + " ".join(sys.argv[1:]), flush=True)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    loaded = load_model(None)
    scratch = tempfile.mkdtemp(prefix="kvtier-workloads-")
    payload = {"args": vars(args), "threads": torch.get_num_threads()}
    try:
        with ExitStack() as stack:
            specs = {}
            if "redis" in args.configs:
                specs["redis"] = {"type": "redis", "url": stack.enter_context(servers.redis_server()).url}
            if "obj" in args.configs:
                s3 = stack.enter_context(servers.s3_server())
                specs["obj"] = s3.tier_spec(s3.create_bucket("kvtier-workloads"))
            if "store" in args.configs:
                specs["store"] = stack.enter_context(servers.store_daemon("--cpu-bytes", str(4 << 30))).tier_spec()
            for workload in args.workloads:
                specs["fs"] = {"type": "fs", "path": os.path.join(scratch, f"fs-{workload}")}  # empty for each
                payload[workload] = (bench_docqa if workload == "docqa" else bench_rag)(loaded, specs, args)
                print(f"  {workload} done at {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if payload.get("docqa"):
        s = payload["docqa"]["setup"]
        report("docqa", f"{s['docs']} documents of {s['doc_tokens']} tokens, {s['queries']} queries in a shuffled "
               f"order after a warm-up round; device pool {s['pool_tokens']} tokens", payload["docqa"], DOCQA_TARGET)
    if payload.get("rag"):
        s = payload["rag"]["setup"]
        report("rag", f"{s['convs']} conversations x {s['turns']} turns over a corpus of {s['corpus']} documents of "
               f"{s['doc_tokens']} tokens; device pool {s['pool_tokens']} tokens", payload["rag"], None)
    payload.update(loadavg_start=load_start, loadavg_end=os.getloadavg()[0], wall_s=time.perf_counter() - started)
    print(f"\nload average {load_start:.2f} at start, {payload['loadavg_end']:.2f} at end; "
          f"wall time {payload['wall_s']:.0f} s")
    emit_json("bench_workloads", payload, args.out, draw)


if __name__ == "__main__":
    main()
