"""Differential fuzzing of reuse, many seeds on demand (tests/fuzz_reuse.py
says what a seed does and what must hold).

    python -m benchmarks.fuzz_reuse --seeds 2000            # every shape, every tier
    python -m benchmarks.fuzz_reuse --start 5000 --seeds 50 --shapes qwen2-hybrid --tiers redis obj

Seed s runs on shape SHAPES[s % len] and tier TIERS[(s // len(SHAPES)) % len],
so any range covers every pair. redis-server, moto's S3 server and a kvtier
store daemon run on 127.0.0.1 for the whole run. Prints one line a seed, then how many ran clean
per shape and tier; failures (with what differed) go to --report as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/ is not a package

import torch  # noqa: E402

from benchmarks.common import return_freed_memory  # noqa: E402

import fuzz_reuse  # noqa: E402
import servers  # noqa: E402

SHAPES = ("default", "qwen2-hybrid", "mistral-all-sliding")


def rss_mib() -> int:
    """Resident memory now: a long run must stay flat."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


def load_shapes(names: list[str], scratch: Path):
    from kvtier.engine.model.loader import load_model

    from tiny_models import save_tiny
    base = load_model(None, torch.float32)
    models = {}
    for name in names:
        if name == "default":
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(**base.hf_reference, dtype=torch.float32).eval()
            models[name] = (base, hf, 0.35)  # shorter prompts: it costs ~50x a tiny model per token
        else:
            hf, loaded = save_tiny(name, scratch / name, base.tokenizer, window=32)
            models[name] = (loaded, hf, 1.0)
    return models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--tiers", nargs="+", default=list(fuzz_reuse.TIERS), choices=fuzz_reuse.TIERS)
    parser.add_argument("--hf-every", type=int, default=10, help="check the reference against HF every N seeds")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each seed this many times (a seed whose failure depends on timing)")
    parser.add_argument("--report", default="fuzz_reuse_report.json")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads (1 leaves a core free for other work)")
    args = parser.parse_args()
    # `kill` of a long run must still stop the servers it started (the ExitStack below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(max(1, args.threads))
    import logging
    logging.basicConfig(level=logging.ERROR)

    clean, failed, failures = Counter(), Counter(), []
    started = time.monotonic()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="kvtier-fuzz-") as scratch_dir:
        scratch = Path(scratch_dir)
        models = load_shapes(args.shapes, scratch)
        running = {"redis": stack.enter_context(servers.redis_server()),
                   "s3": stack.enter_context(servers.s3_server()),
                   "store": stack.enter_context(servers.store_daemon("--cpu-bytes", str(1 << 30)))}
        caches: dict[str, dict] = {name: {} for name in models}
        for seed in (s for s in range(args.start, args.start + args.seeds) for _ in range(args.repeat)):
            shape = args.shapes[seed % len(args.shapes)]
            tier = args.tiers[(seed // len(args.shapes)) % len(args.tiers)]
            model, hf, scale = models[shape]
            t0 = time.monotonic()
            try:
                summary = fuzz_reuse.run_seed(seed, model, tier, running, scratch, caches[shape],
                                              hf_model=hf if seed % args.hf_every == 0 else None, scale=scale)
                clean[(shape, tier)] += 1
                print(f"seed {seed} {shape} {tier}: clean in {time.monotonic() - t0:.1f} s "
                      f"({summary['requests']} requests, faults {summary['faults']}, "
                      f"{summary['mode']}, {summary['preemptions']} preemptions "
                      f"({summary['swapped_out_blocks']} blocks swapped), {summary['failed_loads']} failed loads, "
                      f"{summary['cached_tokens']} cached, tier hits {summary['tier_hit_tokens']}, "
                      f"near ties at {summary['near_ties']}, rss {rss_mib()} MiB)",
                      flush=True)
            except Exception as error:  # a failure, or a bug in the harness: both are reported
                failed[(shape, tier)] += 1
                detail = str(error) if isinstance(error, fuzz_reuse.FuzzFailure) else traceback.format_exc()
                failures.append({"seed": seed, "shape": shape, "tier": tier, "error": detail})
                print(f"seed {seed} {shape} {tier}: FAILED\n{detail}", flush=True)
            return_freed_memory()  # each seed's pools and tiers: glibc keeps their arenas otherwise
            for shape_cache in caches.values():  # bound the reference cache (its engines stay)
                if len(shape_cache) > 5000:
                    engines = shape_cache.pop("engines", {})
                    shape_cache.clear()
                    shape_cache["engines"] = engines
    total_clean, total = sum(clean.values()), sum(clean.values()) + sum(failed.values())
    print(f"\n{total_clean} of {total} seeds ran clean in {time.monotonic() - started:.0f} s")
    for shape in args.shapes:
        row = "  ".join(f"{tier} {clean[(shape, tier)]}/{clean[(shape, tier)] + failed[(shape, tier)]}"
                        for tier in args.tiers)
        print(f"  {shape:20s} {row}")
    Path(args.report).write_text(json.dumps({"clean": total_clean, "total": total, "failures": failures}, indent=1))
    return 0 if total_clean == total else 1


if __name__ == "__main__":
    sys.exit(main())
