"""Chat sessions that come back, measured the way a llama.cpp user measures them.

    python -m benchmarks.bench_sessions [--sessions 4] [--session-tokens 2048] [--repeats 3] [--out DIR]

--sessions chat sessions, each opened by a user message of about
--session-tokens tokens, are asked A, B, C, D, then A, B, C, D again through a
real `kvtier serve` on the default model: the OpenAI chat API, streaming,
greedy, --max-tokens output tokens. Round 2 sends each session's conversation
so far (the opening message and round 1's reply) and a short new question.
Reported: round 2's TTFT (the first streamed content), and the TTFT of the
same round-2 request sent again (a repeat).

Setups, each its own server (16-token device and offload blocks):
  all in pool    no connector; the device pool holds every session
  one in pool    no connector; the pool holds one session, so round 2 recomputes
  one + CPU      that pool, and the OffloadingConnector's CPU tier behind it
  restart + fs   that pool with a CPU tier and an fs tier; the server is stopped
                 after round 1 and a new one (empty pool and CPU tier, the same
                 fs directory) answers round 2

With every session in the pool, round 2 computes only the new question and the
chat template around it. It is compared with one decode step at that context
as the server streams it: the median gap between round 2's streamed tokens,
which also holds the server's per-token overhead (detokenize, one SSE frame).
Every setup's replies are checked equal to "all in pool"'s.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402

from benchmarks.bench_connectors import offloading_config  # noqa: E402
from benchmarks.common import emit_json, median, ttft_boxes  # noqa: E402

import servers  # noqa: E402

WORDS = ["river", "stone", "market", "winter", "signal", "garden", "copper", "lantern", "harbor", "violet"]
BLOCK = 16


def opening(tokenizer, n_tokens: int, rng: random.Random, i: int) -> str:
    """A user message of about n_tokens tokens: a document to talk about."""
    words: list[str] = []
    while len(tokenizer(" ".join(words)).input_ids) < n_tokens - 24:
        words.extend(f"{rng.choice(WORDS)}{rng.randrange(1000)}" for _ in range(64))
    while len(words) > 1 and len(tokenizer(" ".join(words)).input_ids) > n_tokens - 24:
        words = words[:-8]
    return f"Session {i}. Here is a document:\n" + " ".join(words) + "\nSummarise it in one line."


def stream_chat(client: httpx.Client, url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat request: TTFT, the gaps between content chunks, the reply, usage."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    marks, text, usage = [], [], None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode(errors='replace')}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {}).get("content")
                if delta:
                    marks.append(time.perf_counter() - t0)
                    text.append(delta)
    if not marks:
        raise RuntimeError("no content streamed")
    return {"ttft": marks[0], "gaps": [b - a for a, b in zip(marks, marks[1:])], "reply": "".join(text),
            "prompt_tokens": usage["prompt_tokens"] if usage else None,
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") if usage else None}


class Setup:
    def __init__(self, name: str, args: list[str], restart: bool = False) -> None:
        self.name, self.args, self.restart = name, args, restart


def run_setup(setup: Setup, openings: list[str], question: str, max_tokens: int, repeats: int) -> dict:
    server = servers.KvtierServer(*setup.args).start()
    try:
        with httpx.Client(timeout=600) as client:
            convs = [[{"role": "user", "content": text}] for text in openings]
            round1 = []
            for conv in convs:
                out = stream_chat(client, server.url, conv, max_tokens)
                conv.append({"role": "assistant", "content": out["reply"]})
                conv.append({"role": "user", "content": question})
                round1.append(out)
            if setup.restart:
                # The fs tier's writes finish on shutdown; the new server starts with an empty pool and CPU tier.
                server.close()
                server = servers.KvtierServer(*setup.args).start()
            round2 = [stream_chat(client, server.url, conv, max_tokens) for conv in convs]
            # The same round-2 request again, `repeats` times: everything but its last token cached.
            repeat = [stream_chat(client, server.url, convs[-1], max_tokens) for _ in range(repeats)]
    finally:
        server.close()
    return {"round1_ttfts": [o["ttft"] for o in round1], "round2_ttfts": [o["ttft"] for o in round2],
            "repeat_ttfts": [o["ttft"] for o in repeat],
            "round2_gaps": [g for o in round2 for g in o["gaps"]],
            "round2_cached": [o["cached_tokens"] for o in round2],
            "round2_prompt_tokens": [o["prompt_tokens"] for o in round2],
            "replies": [o["reply"] for o in round1 + round2]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--session-tokens", type=int, default=2048, help="tokens of a session's opening message")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="times the last round-2 request is sent again")
    ap.add_argument("--setups", nargs="+", default=["all in pool", "one in pool", "one + CPU", "restart + fs"])
    ap.add_argument("--out", default=None, help="write bench_sessions.json and .png here")
    args = ap.parse_args()
    import torch

    from kvtier.engine.model.loader import load_model
    tokenizer = load_model(None, torch.float32).tokenizer
    rng = random.Random(7)
    openings = [opening(tokenizer, args.session_tokens, rng, i) for i in range(args.sessions)]
    question = "And which word comes up most often? Answer in a few words."
    session_blocks = -(-(args.session_tokens + 2 * args.max_tokens + 64) // BLOCK)
    one = ["--num-gpu-blocks-override", str(session_blocks + 8)]
    fs_dir = tempfile.mkdtemp(prefix="kvtier-bench-sessions-")
    cpu = json.dumps(offloading_config(2 << 30, [], BLOCK))
    cpu_fs = json.dumps(offloading_config(2 << 30, [{"type": "fs", "path": fs_dir}], BLOCK))
    known = {
        "all in pool": Setup("all in pool", ["--num-gpu-blocks-override", str(args.sessions * session_blocks + 8)]),
        "one in pool": Setup("one in pool", one),
        "one + CPU": Setup("one + CPU", [*one, "--kv-transfer-config", cpu]),
        "restart + fs": Setup("restart + fs", [*one, "--kv-transfer-config", cpu_fs], restart=True),
    }
    unknown = [s for s in args.setups if s not in known]
    if unknown:
        ap.error(f"--setups: unknown {unknown}; choose from {list(known)}")
    results = {}
    try:
        for name in args.setups:
            results[name] = r = run_setup(known[name], openings, question, args.max_tokens, args.repeats)
            print(f"{name}: round 2 TTFT median {median(r['round2_ttfts']) * 1e3:.0f} ms "
                  f"({', '.join(f'{t * 1e3:.0f}' for t in r['round2_ttfts'])}), repeat "
                  f"{median(r['repeat_ttfts']) * 1e3:.0f} ms, cached {r['round2_cached']} of "
                  f"{r['round2_prompt_tokens']}", flush=True)
    finally:
        shutil.rmtree(fs_dir, ignore_errors=True)
    reference = results[args.setups[0]]["replies"]
    for name, r in results.items():
        if r["replies"] != reference:
            raise SystemExit(f"{name}: replies differ from {args.setups[0]}'s")
    rows = []
    for name, r in results.items():
        row = {"setup": name, "round2_median_ms": median(r["round2_ttfts"]) * 1e3,
               "round2_max_ms": max(r["round2_ttfts"]) * 1e3, "repeat_median_ms": median(r["repeat_ttfts"]) * 1e3,
               "token_gap_median_ms": median(r["round2_gaps"]) * 1e3 if r["round2_gaps"] else None}
        rows.append(row)
    print(f"\n{args.sessions} sessions of ~{args.session_tokens} tokens, {args.max_tokens} output tokens, "
          f"device pool of {session_blocks + 8} blocks for one session")
    print("| setup | round 2 TTFT median (ms) | max (ms) | repeat (ms) | token gap (ms) | round 2 / token gap |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        gap = row["token_gap_median_ms"]
        print(f"| {row['setup']} | {row['round2_median_ms']:.0f} | {row['round2_max_ms']:.0f} | "
              f"{row['repeat_median_ms']:.0f} | {gap:.0f} | {row['round2_median_ms'] / gap:.2f} |")
    print("targets: one + CPU and restart + fs round 2 <= 60 ms; all in pool <= 1.2x a decode step "
          "plus the server's overhead")

    def draw(_payload, plt):
        fig, ax = plt.subplots(figsize=(7, 4))
        ttft_boxes(ax, {name: r["round2_ttfts"] for name, r in results.items()},
                   f"{args.sessions} chat sessions of ~{args.session_tokens} tokens: round 2 TTFT")
        return fig

    emit_json("bench_sessions", {"setup": {"sessions": args.sessions, "session_tokens": args.session_tokens,
                                           "max_tokens": args.max_tokens, "one_session_blocks": session_blocks + 8},
                                 "rows": rows, "runs": results}, args.out, draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
