"""How close a hit and a decode step come to what the memory allows.

    python -m benchmarks.bench_floor [--tokens 4096] [--reps 3] [--kv-dtypes auto float16]

On a CPU, the KV of a long prompt and the weights are read from memory at
about the rate of one memcpy; nothing faster is possible. Measured in the same
run, on the default model:

- copy rate: one warm 256 MiB memcpy (dst.copy_(src)); "memcpy" below is the
  prompt's KV bytes at that rate.
- decode floor: one pass over the weights and the KV at that rate.
- CPU-tier hit floor: one memcpy of the KV (tier -> pool) plus a decode floor
  (the step that computes the last prompt token reads the weights and the KV).

and the engine's figures against them:

- decode step: one batch-1 decode step at that context (the median of 16).
- device hit: TTFT of a prompt whose KV is all in the device prefix cache
  (the last, partial block is recomputed), against one decode step.
- CPU-tier hit: TTFT of the same prompt with the device prefix cache dropped,
  its KV in the OffloadingConnector's CPU tier (16-token offload blocks).
- cold: TTFT with nothing cached, for scale.

Every kv dtype runs in its own engine; each rep uses a new random prompt.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from benchmarks.common import emit_json, median, print_table, return_freed_memory  # noqa: E402
from kvtier.engine.config import EngineConfig  # noqa: E402
from kvtier.engine.core.sampling_params import SamplingParams  # noqa: E402
from kvtier.engine.llm_engine import LLMEngine  # noqa: E402
from kvtier.engine.model.loader import load_model  # noqa: E402

ONE = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
DECODE_STEPS = 16


def copy_rate(nbytes: int = 256 << 20, reps: int = 7) -> float:
    """Bytes a second of one warm memcpy (dst.copy_(src)) of `nbytes`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.zeros_like(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return nbytes / median(times)


def weight_bytes(loaded) -> int:
    """Bytes a forward pass reads: every weight once (a tied lm_head is the embedding)."""
    return sum(t.numel() * t.element_size() for t in loaded.weights.values())


def ttft(engine: LLMEngine, prompt: list[int], params: SamplingParams = ONE) -> tuple[float, int]:
    rid = f"r{time.monotonic_ns()}"
    t = time.perf_counter()
    engine.add_request(rid, prompt, params)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.outputs[0].token_ids:
                elapsed = time.perf_counter() - t
                while engine.has_unfinished_requests():
                    engine.step()
                return elapsed, out.num_cached_tokens


def decode_step(engine: LLMEngine, prompt: list[int]) -> float:
    """Median wall time of one step of a lone request decoding past `prompt`."""
    rid = f"d{time.monotonic_ns()}"
    engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=DECODE_STEPS + 2, ignore_eos=True))
    while not any(o.request_id == rid and o.outputs[0].token_ids for o in engine.step()):
        pass
    times = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return median(times[:DECODE_STEPS])


def measure(loaded, kv_dtype: str, args, rng: random.Random) -> dict:
    n = args.tokens
    blocks = 2 * (n // 16 + 64)
    ktc = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"cpu_bytes_to_use": 4 << 30, "block_size": 16}}
    engine = LLMEngine(EngineConfig(kv_transfer_config=ktc, kv_cache_dtype=kv_dtype, num_gpu_blocks_override=blocks,
                                    max_num_batched_tokens=max(2048, n)), loaded=loaded)
    try:
        kv_bytes = n * engine.runner.kv_cache[0].numel() // 16 * engine.runner.kv_cache.element_size()
        wbytes = weight_bytes(loaded)
        ttft(engine, [rng.randrange(100, 40000) for _ in range(256)])  # warm-up
        runs = []
        for _ in range(args.reps):
            prompt = [rng.randrange(100, 40000) for _ in range(n)]
            cold, _ = ttft(engine, prompt)
            # Its stores to the CPU tier copy the whole KV in the background: not during a timing.
            assert engine.connector.store.flush(120), "background stores did not finish"
            step = decode_step(engine, prompt)
            device_hit, device_cached = ttft(engine, prompt)
            assert engine.connector.store.flush(120), "background stores did not finish"
            assert engine.kv_cache_manager.pool.reset_prefix_cache(), "device blocks still in use"
            cpu_hit, cpu_cached = ttft(engine, prompt)
            assert cpu_cached >= n - 16, f"the CPU tier served {cpu_cached} of {n} tokens"
            assert engine.kv_cache_manager.pool.reset_prefix_cache()
            runs.append({"cold_s": cold, "decode_step_s": step, "device_hit_s": device_hit,
                         "device_cached": device_cached, "cpu_hit_s": cpu_hit, "cpu_cached": cpu_cached,
                         "copy_rate": copy_rate()})
    finally:
        engine.shutdown()
    m = {k: median([r[k] for r in runs]) for k in runs[0]}
    rate = m["copy_rate"]
    decode_floor = (wbytes + kv_bytes) / rate
    hit_floor = kv_bytes / rate + decode_floor
    return {"kv_cache_dtype": str(engine.kv_cache_dtype).removeprefix("torch."), "tokens": n,
            "kv_mb": kv_bytes / 1e6, "weights_mb": wbytes / 1e6, "copy_gb_s": rate / 1e9,
            "memcpy_kv_s": kv_bytes / rate,
            **m, "decode_floor_s": decode_floor, "cpu_hit_floor_s": hit_floor,
            "cpu_hit_vs_floor": m["cpu_hit_s"] / hit_floor, "decode_vs_floor": m["decode_step_s"] / decode_floor,
            "device_hit_vs_decode": m["device_hit_s"] / m["decode_step_s"], "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv-dtypes", nargs="+", default=["auto", "float16"],
                    choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write bench_floor.json and .png here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(None)
    rng = random.Random(0)
    rows = []
    for kv_dtype in args.kv_dtypes:
        rows.append(measure(loaded, kv_dtype, args, rng))
        return_freed_memory()
    print_table(f"{args.tokens}-token context, default model, float32 weights, {torch.get_num_threads()} threads",
                ["kv cache", "KV MB", "memcpy ms", "decode ms", "decode/floor", "device hit ms", "dev hit/decode",
                 "CPU hit ms", "CPU hit/floor", "cold ms"],
                [[r["kv_cache_dtype"], r["kv_mb"], r["memcpy_kv_s"] * 1e3, r["decode_step_s"] * 1e3,
                  r["decode_vs_floor"], r["device_hit_s"] * 1e3, r["device_hit_vs_decode"], r["cpu_hit_s"] * 1e3,
                  r["cpu_hit_vs_floor"], r["cold_s"] * 1e3] for r in rows])
    print("\ntargets: CPU hit <= 1.5x floor, decode <= 1.5x floor, device hit <= 1.2x decode")
    emit_json("bench_floor", {"rows": rows, "threads": torch.get_num_threads()}, args.out, draw)


def draw(payload: dict, plt):
    """Per kv dtype: each measured time beside the floor it is held to."""
    pairs = [("decode step", "decode_step_s", "decode_floor_s"), ("CPU-tier hit", "cpu_hit_s", "cpu_hit_floor_s"),
             ("device hit", "device_hit_s", "decode_step_s")]
    fig, axes = plt.subplots(1, len(payload["rows"]), figsize=(5.5 * len(payload["rows"]), 4), squeeze=False, layout="constrained")
    for ax, row in zip(axes[0], payload["rows"]):
        xs = range(len(pairs))
        ax.bar([x - 0.2 for x in xs], [row[m] * 1e3 for _, m, _ in pairs], 0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], [row[f] * 1e3 for _, _, f in pairs], 0.4,
               label="floor (device hit: one decode step)")
        ax.set_xticks(list(xs), [name for name, _, _ in pairs])
        ax.set_ylabel("ms")
        ax.set_title(f"{row['tokens']} tokens, kv {row['kv_cache_dtype']}, {payload['threads']} threads")
        ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    main()
