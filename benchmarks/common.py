"""Helpers shared by the benchmarks: timing, tables, JSON."""
from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def timer(out: list):
    t = time.perf_counter()
    yield
    out.append(time.perf_counter() - t)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def median_time(fn, reps: int) -> float:
    """Seconds per call of fn: the median of `reps` after one untimed warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def emit_json(name: str, payload: dict, out_dir: str | None = None, draw=None) -> None:
    """Print the results as one JSON line; with `out_dir`, also write
    <out_dir>/<name>.json and, when `draw(payload, plt)` is given and
    matplotlib (the `plots` extra) is installed, <out_dir>/<name>.png beside it."""
    text = json.dumps(payload, sort_keys=True)
    print(f"\nJSON {name}: " + text)
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(text + "\n")
    print(f"wrote {out / f'{name}.json'}")
    if draw is None:
        return
    try:
        import matplotlib
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install 'kvtier[plots]')")
        return
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig = draw(payload, plt)
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out / f'{name}.png'}")


def ttft_boxes(ax, runs: dict[str, list[float]], title: str) -> None:
    """One box (and the points) per configuration: a TTFT distribution."""
    names = list(runs)
    ax.boxplot([runs[n] for n in names], showfliers=False)
    for i, n in enumerate(names, start=1):
        ax.plot([i] * len(runs[n]), runs[n], ".", alpha=0.4, color="tab:blue")
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("TTFT (s, log scale)")
    ax.set_title(title)


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
