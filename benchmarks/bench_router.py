"""KV-aware routing against round robin, over two `kvtier serve` replicas.

    python -m benchmarks.bench_router [--docs 8] [--questions 4] [--doc-tokens 600]

Each replica runs the default model with KV events on and a device pool that
holds about half of the documents (no connector: the device prefix cache is
what routing can reuse). The workload asks several questions about each of
several documents, in a shuffled order, one request at a time. Round robin
sends a document's questions to both replicas, so each computes most
documents and neither can hold them all; the KV-aware router
(examples/kv_router.py) follows both replicas' events and sends each
question to the replica that holds its document. Reported: mean and p90
time to first token (max_tokens=1, so the request's latency), total time,
and the prompt tokens served from cache, side by side in one run.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "examples")]

import httpx  # noqa: E402
from kv_router import KVAwareRouter  # noqa: E402

import servers  # noqa: E402


def workload(tokenizer, docs: int, questions: int, doc_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    words = ["river", "stone", "market", "winter", "signal", "garden", "copper", "lantern", "harbor", "violet"]
    prompts = []
    for d in range(docs):
        doc = " ".join(f"{rng.choice(words)}{rng.randrange(1000)}" for _ in range(doc_tokens // 2))
        doc_ids = tokenizer(f"Document {d}: {doc}").input_ids[:doc_tokens]
        for q in range(questions):
            prompts.append(doc_ids + tokenizer(f"\nQuestion {q}: what is word {q * 7 + 3}?\nAnswer:").input_ids)
    rng.shuffle(prompts)
    return prompts


def run(urls: list[str], prompts: list[list[int]], pick) -> dict:
    ttfts, cached = [], 0
    started = time.perf_counter()
    with httpx.Client(timeout=300) as client:
        for ids in prompts:
            replica = pick(ids)
            t0 = time.perf_counter()
            r = client.post(f"{urls[replica]}/v1/completions",
                            json={"prompt": ids, "max_tokens": 1, "temperature": 0})
            ttfts.append(time.perf_counter() - t0)
            r.raise_for_status()
            cached += r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            getattr(pick, "done", lambda _: None)(replica)
    ttfts.sort()
    return {"mean_ttft": statistics.mean(ttfts), "p90_ttft": ttfts[int(0.9 * (len(ttfts) - 1))],
            "total": time.perf_counter() - started, "cached_tokens": cached,
            "prompt_tokens": sum(len(p) for p in prompts)}


class RoundRobin:
    def __init__(self, n: int) -> None:
        self.n, self.turn = n, 0

    def __call__(self, ids) -> int:
        self.turn += 1
        return (self.turn - 1) % self.n


class Routed:
    def __init__(self, router: KVAwareRouter) -> None:
        self.router = router

    def __call__(self, ids) -> int:
        return self.router.route(ids)

    def done(self, replica: int) -> None:
        self.router.done(replica)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=600)
    args = parser.parse_args()
    import torch

    from kvtier.engine.model.loader import load_model
    tokenizer = load_model(None, torch.float32).tokenizer
    prompts = workload(tokenizer, args.docs, args.questions, args.doc_tokens)
    # About half the documents' blocks per replica, plus room to compute one more.
    blocks = (args.docs // 2 + 1) * -(-(args.doc_tokens + 24) // 16)
    results = {}
    for name in ("round robin", "kv-aware"):
        ports = [servers.free_port() for _ in range(2)]
        events = [json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{p}"}) for p in ports]
        replicas = [servers.KvtierServer("--num-gpu-blocks-override", str(blocks), "--kv-events-config", ev)
                    for ev in events]
        router = None
        try:
            for replica in replicas:
                replica.start()
            urls = [replica.url for replica in replicas]
            if name == "kv-aware":
                router = KVAwareRouter([f"tcp://127.0.0.1:{p}" for p in ports])
                time.sleep(0.5)  # subscribers join before the first event
                pick = Routed(router)
            else:
                pick = RoundRobin(2)
            results[name] = run(urls, prompts, pick)
        finally:
            if router is not None:
                router.close()
            for replica in replicas:
                replica.close()
        r = results[name]
        print(f"{name}: mean TTFT {r['mean_ttft']:.3f} s, p90 {r['p90_ttft']:.3f} s, total {r['total']:.1f} s, "
              f"cached {r['cached_tokens']} of {r['prompt_tokens']} prompt tokens", flush=True)
    rr, kv = results["round robin"], results["kv-aware"]
    print(f"\n{args.docs} documents x {args.questions} questions, {len(prompts)} requests, 2 replicas, "
          f"{blocks} device blocks each")
    print("| routing | mean TTFT (s) | p90 TTFT (s) | total (s) | cached prompt tokens |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['mean_ttft']:.3f} | {r['p90_ttft']:.3f} | {r['total']:.1f} | "
              f"{r['cached_tokens'] / r['prompt_tokens']:.0%} |")
    print(f"kv-aware / round robin: mean TTFT {kv['mean_ttft'] / rr['mean_ttft']:.2f}, "
          f"total {kv['total'] / rr['total']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
