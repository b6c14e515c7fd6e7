"""The workloads benchmark end to end at toy size: it runs every workload
through real tiers, finds the connector's outputs equal to no connector's
(it exits non-zero otherwise), and writes its JSON and PNG with --out."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_workloads_writes_json_and_png(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.bench_workloads", "--docs", "6", "--doc-tokens", "128",
           "--questions", "2", "--corpus", "4", "--rag-doc-tokens", "32", "--system-tokens", "32",
           "--convs", "1", "--turns", "2", "--configs", "none", "cpu", "fs", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    payload = json.loads((tmp_path / "bench_workloads.json").read_text())
    docqa = payload["docqa"]["results"]
    assert set(docqa) == {"none", "cpu", "fs"}
    # A pool of about a quarter of the documents: the query round finds its
    # document in a tier, never in the device pool alone.
    assert docqa["cpu"]["cached_fraction"] > docqa["none"]["cached_fraction"]
    assert all(len(r["ttfts"]) == r["requests"] == 6 for r in docqa.values())
    assert len(payload["rag"]["results"]["fs"]["ttfts"]) == 2
    assert (tmp_path / "bench_workloads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
