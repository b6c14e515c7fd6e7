"""Swap preemption against recompute preemption, on one overloaded workload.

    python -m benchmarks.bench_preemption [--requests 12] [--prompt-tokens 1536]
        [--output-tokens 256] [--pool-fraction 0.33]

Every request arrives at once: `--requests` distinct prompts of about
`--prompt-tokens` tokens, each generating `--output-tokens` (EOS ignored),
through a device pool that holds `--pool-fraction` of what they need at the
end. Runs: swap and recompute with the OffloadingConnector and the same CPU
tier (only `preemption_mode` differs; recompute still finds the victims'
prompt blocks in the CPU tier), recompute with no connector (vLLM's default),
and an unconstrained pool (no preemption: the floor). Shown: total time, mean and p90 end-to-end latency,
preemptions, tokens recomputed because of preemption, device blocks and bytes
swapped out and in, and swap's total time over each other run's. The outputs
of all runs are compared (they must be equal).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from benchmarks.common import emit_json, percentile, print_table, return_freed_memory  # noqa: E402


def prompts(tokenizer, n: int, tokens: int) -> list[list[int]]:
    out = []
    for i in range(n):
        line, text = 0, ""
        while len(tokenizer.encode(text)) < tokens:
            text += f" Record {i}.{line}: sensor {i * 7 + line} read {(i * 31 + line * 17) % 997} units."
            line += 1
        out.append(tokenizer.encode(text)[:tokens])
    return out


# name -> (preemption_mode, with the OffloadingConnector, pool sized by --pool-fraction)
RUNS = {
    "recompute": ("recompute", True, True),
    "swap": ("swap", True, True),
    "recompute, no connector": ("recompute", False, True),  # vLLM's default: prefix caching on device only
    "unconstrained pool": ("recompute", False, False),      # no preemption at all: the floor
}


def run(loaded, name: str, ids: list[list[int]], output_tokens: int, pool_blocks: int, chunk: int) -> dict:
    from kvtier.engine.config import EngineConfig
    from kvtier.engine.core.sampling_params import SamplingParams
    from kvtier.engine.llm_engine import LLMEngine
    mode, connector, constrained = RUNS[name]
    ktc = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"cpu_bytes_to_use": 4 << 30, "block_size": 64}} if connector else None
    engine = LLMEngine(EngineConfig(kv_transfer_config=ktc, preemption_mode=mode,
                                    num_gpu_blocks_override=pool_blocks if constrained else None,
                                    max_num_batched_tokens=chunk), loaded=loaded)
    sp = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(ids):
        engine.add_request(str(i), p, sp)
    done, outputs = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = time.perf_counter() - start
                outputs[out.request_id] = out.outputs[0].token_ids
    total = time.perf_counter() - start
    s = engine.stats()
    page_bytes = engine.runner.kv_cache[0].nbytes
    engine.shutdown()
    latencies = list(done.values())
    return {
        "run": name, "total_s": total, "mean_e2e_s": sum(latencies) / len(latencies),
        "p90_e2e_s": percentile(latencies, 90), "preemptions": s.num_preemptions_total,
        "recomputed_tokens": s.preemption_recomputed_tokens_total,
        "swapped_out_blocks": s.preemption_swapped_out_blocks_total,
        "swapped_in_blocks": s.preemption_swapped_in_blocks_total,
        "swapped_out_mb": s.preemption_swapped_out_blocks_total * page_bytes / 1e6,
        "swapped_in_mb": s.preemption_swapped_in_blocks_total * page_bytes / 1e6,
        "fallbacks": s.preemption_swap_fallbacks_total,
        "restore_mean_ms": 1000 * s.restore.sum / max(1, s.restore.count),
        "outputs": [outputs[str(i)] for i in range(len(ids))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=1536)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--pool-fraction", type=float, default=0.33)
    parser.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    from kvtier.engine.model.loader import load_model
    loaded = load_model(None, torch.float32)
    ids = prompts(loaded.tokenizer, args.requests, args.prompt_tokens)
    need = args.requests * -(-(args.prompt_tokens + args.output_tokens) // 16)
    pool = int(need * args.pool_fraction)
    print(f"{args.requests} requests x ({args.prompt_tokens} prompt + {args.output_tokens} output) tokens "
          f"= {need} blocks of 16; pool {pool} blocks ({args.pool_fraction:.0%})")
    results = {}
    for name in args.runs:
        results[name] = run(loaded, name, ids, args.output_tokens, pool, args.chunk)
        return_freed_memory()
    keys = ["total_s", "mean_e2e_s", "p90_e2e_s", "preemptions", "recomputed_tokens", "swapped_out_blocks",
            "swapped_out_mb", "swapped_in_blocks", "swapped_in_mb", "fallbacks", "restore_mean_ms"]
    names = list(results)
    rows = [[k, *(results[n][k] for n in names)] for k in keys]
    print_table("preemption modes on one overloaded workload", ["", *names], rows)
    if "swap" in results:
        base = results["swap"]["total_s"]
        print("\nswap's total time / each run's: " + ", ".join(
            f"{n} {base / r['total_s']:.3f}" for n, r in results.items() if n != "swap"))
    outputs = [r["outputs"] for r in results.values()]
    same = all(o == outputs[0] for o in outputs)
    print(f"outputs equal across runs: {same}")
    emit_json("bench_preemption", {n: {k: r[k] for k in keys} for n, r in results.items()} | {"equal": same})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
