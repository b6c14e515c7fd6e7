"""Step time with a secondary tier that is dead or slow, against no connector.

    python -m benchmarks.bench_step_time [--requests 24] [--rounds 3]

The same workload runs through each configuration: requests of a few hundred
prompt tokens arrive every few steps while others decode, so every step has
lookups, saves or loads in flight. Each engine.step() is timed; the table
shows p50 / p99 and their ratio to no connector. The tier's own timeout is 5 s,
so any call made on the step loop would show as multi-second steps.

Configurations: no connector; CPU tier only; CPU + Redis (healthy); CPU +
Redis stopped (its port refuses connections); CPU + a port where nothing
listens; CPU + Redis that is hung (SIGSTOP: connections open, no replies);
CPU + Redis behind a proxy that delays every reply by a second. Runs are
interleaved round by round; the median over rounds of each percentile is shown.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from benchmarks.common import return_freed_memory  # noqa: E402

import servers  # noqa: E402


def workload(tokenizer, n: int) -> list[tuple[int, str]]:
    """(arrival step, prompt): distinct prompts, so nothing hits and lookups run for every one."""
    out = []
    for i in range(n):
        text = " ".join(f"Request {i}, line {j}: the value {i * 31 + j} is {(i * j) % 97}." for j in range(25))
        out.append((i * 6, text))
    return out


def run(engine, arrivals, max_tokens: int) -> tuple[list[float], float]:
    """Times of the steps that ran the model (a step with only tier lookups or
    loads to wait for does no work: it is left out), and the total time."""
    from kvtier.engine.core.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    pending = list(arrivals)
    computed = [False]
    execute = engine.runner.execute

    def noting(sched):
        computed[0] = True
        return execute(sched)

    engine.runner.execute = noting
    times, step, started = [], 0, time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, prompt = pending.pop(0)
            engine.add_request(f"r{step}-{len(pending)}", prompt, params)
        computed[0] = False
        t0 = time.perf_counter()
        engine.step()
        if computed[0]:
            times.append(time.perf_counter() - t0)
        step += 1
    return times, time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import logging
    logging.basicConfig(level=logging.ERROR)
    from kvtier.engine.config import EngineConfig
    from kvtier.engine.llm_engine import LLMEngine
    from kvtier.engine.model.loader import load_model

    model = load_model(None, torch.float32)
    arrivals = workload(model.tokenizer, args.requests)

    def ktc(tiers):
        extra = {"cpu_bytes_to_use": 1 << 30, "block_size": 64}
        if tiers:
            extra.update(spec_name="TieringOffloadingSpec", secondary_tiers=tiers)
        return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}

    healthy = servers.RedisServer().start()
    stopped = servers.RedisServer().start()
    stopped.stop()
    hung = servers.RedisServer().start()
    hung.pause()
    slow_target = servers.RedisServer().start()
    slow = servers.DelayingProxy(slow_target.port, delay_s=1.0, commands=(b"",))  # every reply
    nothing = servers.free_port()
    def redis(url):  # a fresh key prefix per run: nothing stored by an earlier one is a hit
        return lambda: [{"type": "redis", "url": url, "timeout_s": 5.0, "key_prefix": f"b{time.monotonic_ns()}:"}]

    configs: dict = {
        "no connector": lambda: None,
        "cpu only": lambda: ktc([]),
        "cpu + redis": redis(healthy.url),
        "cpu + redis stopped": redis(stopped.url),
        "cpu + nothing listening": redis(f"redis://127.0.0.1:{nothing}/0"),
        "cpu + redis hung": redis(hung.url),
        "cpu + redis 1 s slow": redis(slow.url),
    }
    results: dict[str, dict[str, list[float]]] = {name: {"p50": [], "p99": [], "max": [], "total": []}
                                                  for name in configs}
    try:
        for round_ in range(args.rounds):
            for name, tiers in configs.items():
                config = tiers() if name in ("no connector", "cpu only") else ktc(tiers())
                engine = LLMEngine(EngineConfig(kv_transfer_config=config, max_num_batched_tokens=512), loaded=model)
                try:
                    run(engine, arrivals[:2], 4)  # warm-up: kernels built, pools touched
                    times, total = run(engine, arrivals, args.max_tokens)
                finally:
                    engine.shutdown()
                    del engine
                    return_freed_memory()
                for key, value in (("p50", pct(times, 0.5)), ("p99", pct(times, 0.99)), ("max", max(times)),
                                   ("total", total)):
                    results[name][key].append(value)
                print(f"round {round_ + 1} {name}: {len(times)} model steps, p50 {pct(times, 0.5) * 1e3:.1f} ms, "
                      f"p99 {pct(times, 0.99) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms, total {total:.1f} s",
                      flush=True)
    finally:
        hung.close()
        slow.close()
        for server in (healthy, stopped, slow_target):
            server.close()
    base = {key: statistics.median(results["no connector"][key]) for key in ("p50", "p99")}
    print("\n| configuration | step p50 (ms) | step p99 (ms) | max (ms) | p50 / no connector | p99 / no connector "
          "| total (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        p50, p99, mx, total = (statistics.median(r[k]) for k in ("p50", "p99", "max", "total"))
        print(f"| {name} | {p50 * 1e3:.1f} | {p99 * 1e3:.1f} | {mx * 1e3:.1f} | {p50 / base['p50']:.2f} | "
              f"{p99 / base['p99']:.2f} | {total:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
