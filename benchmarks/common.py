"""Helpers shared by the benchmarks: timing, tables, JSON."""
from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager


@contextmanager
def timer(out: list):
    t = time.perf_counter()
    yield
    out.append(time.perf_counter() - t)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def emit_json(name: str, payload: dict) -> None:
    print(f"\nJSON {name}: " + json.dumps(payload, sort_keys=True))


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def return_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps the
    arenas of dropped KV pools mapped; a run that builds engine after engine
    would otherwise grow until the machine runs out of memory)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
