"""The hybrid KV-cache allocator at long context: sliding-window layers against the
same weights run as all-full attention.

    python -m benchmarks.bench_hybrid [--quick]

A tiny random Qwen2 (6 layers: 5 sliding_attention + 1 full_attention, Gemma 3's
5:1, window 1024; 2 heads of 32, 1 KV head) is saved with transformers and loaded
by kvtier twice: as is, and with every layer declared full attention. For each
layout:

1. KV bytes one 8192-token request holds, stepped by hand through chunked
   prefill and a few decodes (peak, end of prefill, decode), against the theory
   full_fraction + sliding_fraction * window / context.
2. How many 8192-token requests run at once in the same pool bytes (peak
   RUNNING, preemptions, wall time). Default: 8 requests, 32 output tokens, a
   pool of 2 all-full requests; --quick: 4, 16, 1 (each layout prefills
   1 + requests prompts of 8k tokens, ~5-10 s each on 2 CPU cores).

Sanity: greedy output of the solo 8k request equals that of the same prompt in
the concurrent run (two fresh engines), for both layouts; every request completes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit_json, print_table, timer
from kvtier.engine.config import EngineConfig
from kvtier.engine.core.kv_cache import FullAttentionSpec, SlidingWindowSpec
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.llm_engine import LLMEngine
from kvtier.engine.model.loader import load_model

MIB = 1 << 20
NUM_LAYERS, NUM_FULL = 6, 1  # Gemma 3's 5 sliding : 1 full


def build_models(root: Path, context: int, window: int, max_tokens: int) -> tuple[Path, Path]:
    """Save one random Qwen2 twice: hybrid layer types, and every layer full attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = load_model(None, torch.float32).tokenizer  # the default model's, as the tests do
    layer_types = ["sliding_attention"] * (NUM_LAYERS - NUM_FULL) + ["full_attention"] * NUM_FULL
    # Narrow (2 heads of 32, 1 KV head): prefill on the CPU is attention-bound at 8k, and
    # the KV ratios measured here do not depend on the head count.
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
                      num_hidden_layers=NUM_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=context + max(256, 2 * max_tokens), sliding_window=window,
                      use_sliding_window=True, max_window_layers=0, layer_types=layer_types,
                      tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
                      initializer_range=0.2)  # peaked logits: greedy choices are not near-ties
    torch.manual_seed(0)
    hybrid, full = root / "hybrid", root / "all-full"
    Qwen2ForCausalLM(cfg).eval().save_pretrained(hybrid, safe_serialization=True)
    tokenizer.save_pretrained(hybrid)
    shutil.copytree(hybrid, full)  # the same weight bytes
    config = json.loads((full / "config.json").read_text())
    config.update(layer_types=["full_attention"] * NUM_LAYERS, use_sliding_window=False)
    (full / "config.json").write_text(json.dumps(config, indent=2))
    return hybrid, full


def make_engine(loaded, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(device="cpu", dtype="float32", **kw), loaded=loaded)


def page_bytes(engine: LLMEngine) -> int:
    kv = engine.runner.kv_cache
    return kv[0].numel() * kv.element_size()


def held_bytes(engine: LLMEngine, req_id: str) -> int:
    """KV bytes the request holds now: its non-null blocks in every group, times the page size."""
    blocks = sum(1 for table in engine.kv_cache_manager.block_ids(req_id) for b in table if b != 0)
    return blocks * page_bytes(engine)


def random_prompt(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def one_request(loaded, prompt: list[int], max_tokens: int, pool_blocks: int) -> dict:
    """Step one request by hand; KV bytes it holds at the peak, at the end of prefill
    (the step that samples its first token) and on the next (decode) step."""
    engine = make_engine(loaded, num_gpu_blocks_override=pool_blocks, enable_prefix_caching=False)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request("r", prompt, sp)
    peak, prefill_end, decode, tokens, steps = 0, None, None, [], 0
    t0 = time.perf_counter()
    prefill_s = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        now = held_bytes(engine, "r")
        peak = max(peak, now)
        n_out = len(outs[0].outputs[0].token_ids) if outs else 0
        if n_out == 1:
            prefill_end, prefill_s = now, time.perf_counter() - t0
        elif n_out == 2:
            decode = now
        if outs and outs[0].finished:
            tokens = outs[0].outputs[0].token_ids
    assert engine.kv_cache_manager.pool.num_free_blocks == engine.num_blocks - 1, "blocks leaked"
    return {"groups": [g.label for g in engine.groups], "page_bytes": page_bytes(engine),
            "peak_bytes": peak, "prefill_end_bytes": prefill_end, "decode_bytes": decode,
            "prefill_s": prefill_s, "total_s": time.perf_counter() - t0, "steps": steps, "tokens": tokens}


def concurrent(loaded, prompts: list[list[int]], max_tokens: int, pool_blocks: int) -> dict:
    """All requests at once into a pool of `pool_blocks` pages; peak running and preemptions."""
    engine = make_engine(loaded, num_gpu_blocks_override=pool_blocks, max_num_seqs=len(prompts))
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, sp)
    seen = {"peak_running": 0, "prefill_tokens": 0}
    schedule = engine.scheduler.schedule

    def observed_schedule():  # on this instance only: RUNNING right after planning, tokens computed
        out = schedule()
        seen["peak_running"] = max(seen["peak_running"], len(engine.scheduler.running))
        seen["prefill_tokens"] += sum(s.num_new_tokens for s in out.scheduled if s.num_new_tokens > 1
                                      or s.request.num_computed_tokens < s.request.num_prompt_tokens)
        return out

    engine.scheduler.schedule = observed_schedule
    peak_usage, steps, done, wall = 0.0, 0, {}, []
    with timer(wall):
        while engine.has_unfinished_requests():
            outs = engine.step()
            steps += 1
            done.update((o.request_id, o) for o in outs if o.finished)
            peak_usage = max(peak_usage, engine.kv_cache_manager.usage)
    ok = len(done) == len(prompts) and all(len(o.outputs[0].token_ids) == max_tokens for o in done.values())
    return {"pool_pages": pool_blocks, "page_bytes": page_bytes(engine), "pool_bytes": pool_blocks * page_bytes(engine),
            "peak_running": seen["peak_running"], "preemptions": engine.stats().num_preemptions_total,
            "prefill_tokens": seen["prefill_tokens"], "peak_pool_usage": peak_usage, "wall_s": wall[0],
            "steps": steps, "all_completed": ok,
            "first_request_tokens": done["0"].outputs[0].token_ids if "0" in done else []}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smaller pool and fewer concurrent requests")
    ap.add_argument("--requests", type=int, help="concurrent requests (default 8, quick 4)")
    ap.add_argument("--pool-requests", type=int, help="pool bytes, in all-full requests (default 2, quick 1)")
    ap.add_argument("--max-tokens", type=int, help="output tokens per concurrent request (default 32, quick 16)")
    args = ap.parse_args()
    print("command: " + " ".join(["python", "-m", "benchmarks.bench_hybrid", *sys.argv[1:]]))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    context, window, one_max_tokens = 8192, 1024, 8
    n_requests = args.requests or (4 if args.quick else 8)
    pool_requests = args.pool_requests or (1 if args.quick else 2)
    # Requests are admitted one prefill (4 chunks) at a time: they must live long enough
    # for the pool, not the admission rate, to bound how many run at once.
    conc_max_tokens = args.max_tokens or (16 if args.quick else 32)
    assert conc_max_tokens >= one_max_tokens
    rng = random.Random(0)
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench_hybrid-") as tmp:
        hybrid_dir, full_dir = build_models(Path(tmp), context, window, conc_max_tokens)
        hybrid = load_model(str(hybrid_dir), torch.float32)
        full = load_model(str(full_dir), torch.float32)

    probe_h, probe_f = make_engine(hybrid, num_gpu_blocks_override=2), make_engine(full, num_gpu_blocks_override=2)
    groups_h, groups_f = probe_h.groups, probe_f.groups
    assert sum(isinstance(g.spec, SlidingWindowSpec) for g in groups_h) == NUM_LAYERS - NUM_FULL
    full_groups_ok = (len(groups_f) == 1 and isinstance(groups_f[0].spec, FullAttentionSpec)
                      and groups_f[0].layers == tuple(range(NUM_LAYERS)))
    assert full_groups_ok, groups_f
    bs, chunk = probe_h.block_size, probe_h.config.max_num_batched_tokens
    page_h, page_f = page_bytes(probe_h), page_bytes(probe_f)
    del probe_h, probe_f

    # -- 1. KV bytes held by one long request ------------------------------
    prompt = random_prompt(context, rng)
    blocks_one = -(-(context + one_max_tokens) // bs)
    one_h = one_request(hybrid, prompt, one_max_tokens, 2 * len(groups_h) * blocks_one)
    one_f = one_request(full, prompt, one_max_tokens, 2 * blocks_one)

    f_full = NUM_FULL / NUM_LAYERS
    theory_decode = f_full + (1 - f_full) * window / context
    theory_chunk = f_full + (1 - f_full) * min(context, window + chunk) / context
    rows, mem_rows = [], []
    for key, label, theory in [("peak_bytes", "peak (during prefill)", theory_chunk),
                               ("prefill_end_bytes", "end of prefill (last chunk in flight)", theory_chunk),
                               ("decode_bytes", "first decode step (window only)", theory_decode)]:
        ratio = one_h[key] / one_f[key]
        rows.append([label, one_h[key] / MIB, one_f[key] / MIB, ratio, theory])
        mem_rows.append({"point": key, "hybrid_bytes": one_h[key], "all_full_bytes": one_f[key],
                         "ratio": ratio, "theory": theory})
    print_table(f"KV held by one {context}-token request (MiB; hybrid {len(groups_h)} groups x "
                f"{page_h // 1024} KiB pages, all-full 1 group x {page_f // 1024} KiB pages; chunk {chunk})",
                ["point", "hybrid MiB", "all-full MiB", "hybrid/all-full", "theory"], rows)
    print(f"\ntheory: decode = {f_full:.3f} + {1 - f_full:.3f} x {window}/{context} = {theory_decode:.3f}; "
          f"prefill = {f_full:.3f} + {1 - f_full:.3f} x ({window}+{chunk})/{context} = {theory_chunk:.3f} "
          f"(a sliding group also holds the chunk being prefilled)")

    # -- 2. Concurrent long requests in the same pool bytes ----------------
    # Request "0" repeats the prompt above: its greedy tokens are the second run of the sanity check.
    prompts = [prompt] + [random_prompt(context, rng) for _ in range(n_requests - 1)]
    pool_f = pool_requests * -(-(context + conc_max_tokens) // bs)
    assert (pool_f * page_f) % page_h == 0
    pool_h = pool_f * page_f // page_h  # same bytes
    conc_h = concurrent(hybrid, prompts, conc_max_tokens, pool_h)
    conc_f = concurrent(full, prompts, conc_max_tokens, pool_f)
    rows = []
    for name, r in [("hybrid", conc_h), ("all-full", conc_f)]:
        fit = r["pool_bytes"] / (one_h if name == "hybrid" else one_f)["decode_bytes"]
        rows.append([name, r["pool_bytes"] / MIB, r["pool_pages"], r["page_bytes"] // 1024, n_requests, fit,
                     r["peak_running"], r["preemptions"], r["prefill_tokens"], r["peak_pool_usage"], r["steps"],
                     r["wall_s"]])
    rows.append(["hybrid/all-full", conc_h["pool_bytes"] / conc_f["pool_bytes"], "", "", "",
                 one_f["decode_bytes"] / one_h["decode_bytes"], conc_h["peak_running"] / conc_f["peak_running"], "",
                 conc_h["prefill_tokens"] / conc_f["prefill_tokens"], "", conc_h["steps"] / conc_f["steps"],
                 conc_h["wall_s"] / conc_f["wall_s"]])
    print_table(f"{n_requests} concurrent {context}-token requests, {conc_max_tokens} output tokens each, "
                f"same pool bytes (= {pool_requests} all-full requests)",
                ["layout", "pool MiB", "pages", "page KiB", "requests", "fit (pool / decode KV)", "peak running",
                 "preemptions", "prefill tokens computed", "peak pool usage", "steps", "wall s"], rows)

    # -- sanity ------------------------------------------------------------
    checks = [
        ["all-full layout has one full-attention group of all layers", full_groups_ok],
        ["hybrid greedy: solo run == same prompt in the concurrent run (first 8 tokens)",
         len(one_h["tokens"]) == one_max_tokens and conc_h["first_request_tokens"][:one_max_tokens] == one_h["tokens"]],
        ["all-full greedy: solo run == same prompt in the concurrent run (first 8 tokens)",
         len(one_f["tokens"]) == one_max_tokens and conc_f["first_request_tokens"][:one_max_tokens] == one_f["tokens"]],
        ["every concurrent request completes (both layouts)", conc_h["all_completed"] and conc_f["all_completed"]],
    ]
    print_table("Sanity", ["check", "ok"], checks)
    total_s = time.perf_counter() - t_start
    print(f"\ntotal {total_s:.1f} s; hybrid 8k prefill {one_h['prefill_s']:.1f} s, "
          f"all-full {one_f['prefill_s']:.1f} s")
    emit_json("bench_hybrid", {
        "quick": args.quick, "context": context, "window": window, "block_size": bs, "chunk": chunk,
        "groups": {"hybrid": one_h["groups"], "all_full": one_f["groups"]},
        "page_bytes": {"hybrid": page_h, "all_full": page_f},
        "one_request": mem_rows,
        "one_request_time_s": {"hybrid": one_h["total_s"], "all_full": one_f["total_s"]},
        "concurrent": {"requests": n_requests, "max_tokens": conc_max_tokens, "hybrid": conc_h, "all_full": conc_f},
        "checks": {c: ok for c, ok in checks}, "total_s": total_s, "threads": torch.get_num_threads()})
    if not all(ok for _, ok in checks):
        raise SystemExit("sanity check failed")


if __name__ == "__main__":
    main()
