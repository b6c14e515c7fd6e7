"""The tail of a prefix hit: a short prefill chunk over a long cached context.

    python -m benchmarks.bench_prefill_tail [--context 2048] [--rows 1 8 20 32 64 128] [--reps 5]

A follow-up question or a chat's new turn computes a few dozen tokens against
thousands already in the pool. Measured per chunk length, on the default
model's attention shape (9 heads over 3 kv heads, head_dim 64, 30 layers,
16-token pages), over all 30 layers:

- kernel: the CPU kernel (engine/attention/csrc/paged_decode.cpp) reading the
  pages in place, as the runner calls it for chunks up to KERNEL_MAX_QUERIES.
- sdpa: the baseline, torch's path for longer chunks: gather the context's
  pages, then one SDPA with the causal mask.

Both outputs are compared (max abs difference) so the speed is of the same
answer. The floor is arithmetic: 4 * rows * heads * keys * head_dim flops per
layer at the rate of one big float32 GEMM, measured in the same run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import emit_json, median_time, print_table  # noqa: E402
from kvtier.engine.attention import cpu_kernel  # noqa: E402

BS, KVH, D, H, LAYERS = 16, 3, 64, 9, 30


def gemm_rate() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    return 2 * 2048 ** 3 / median_time(lambda: a @ b, 5)


def measure(kernel, kv: torch.Tensor, context: int, rows: int, reps: int) -> dict:
    length = context + rows
    table = torch.arange(-(-length // BS), dtype=torch.long)
    q = torch.randn(rows, H, D)
    out = torch.empty_like(q)
    index = [torch.tensor([0]), torch.tensor([rows]), table[None], torch.tensor([length]), torch.tensor([0])]

    def run_kernel():
        for layer in range(LAYERS):
            kernel.paged_decode_attention(out, q, kv, layer, *index, 0, D ** -0.5)

    mask = torch.arange(context, length)[:, None] >= torch.arange(length)[None]
    ref = []

    def run_sdpa():
        ref.clear()
        for layer in range(LAYERS):
            k = kv[table, layer, 0].reshape(-1, KVH, D)[:length].transpose(0, 1).unsqueeze(0)
            v = kv[table, layer, 1].reshape(-1, KVH, D)[:length].transpose(0, 1).unsqueeze(0)
            ref.append(F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k, v, attn_mask=mask,
                                                      scale=D ** -0.5, enable_gqa=True))
    run_kernel()
    run_sdpa()
    diff = (out - ref[-1][0].transpose(0, 1)).abs().max().item()
    return {"rows": rows, "kernel_s": median_time(run_kernel, reps), "sdpa_s": median_time(run_sdpa, reps),
            "max_abs_diff": diff, "gflop": 4 * rows * H * length * D * LAYERS / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 20, 32, 64, 128])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    kernel = cpu_kernel.load()
    if kernel is None:
        raise SystemExit("the CPU kernel could not be built here (see the log)")
    torch.manual_seed(0)
    kv = torch.randn(-(-(args.context + max(args.rows)) // BS), LAYERS, 2, BS, KVH, D)
    rate = gemm_rate()
    results = [measure(kernel, kv, args.context, r, args.reps) for r in args.rows]
    for r in results:
        r["floor_s"] = r["gflop"] * 1e9 / rate
    print_table(f"prefill tail over {args.context} cached tokens, {LAYERS} layers (GEMM rate {rate / 1e9:.0f} GFLOPS)",
                ["rows", "kernel ms", "sdpa ms", "kernel / sdpa", "kernel / floor", "max diff"],
                [[r["rows"], r["kernel_s"] * 1e3, r["sdpa_s"] * 1e3, r["kernel_s"] / r["sdpa_s"],
                  r["kernel_s"] / r["floor_s"], r["max_abs_diff"]] for r in results])
    emit_json("bench_prefill_tail", {"context": args.context, "gemm_flops": rate, "results": results}, args.out)


if __name__ == "__main__":
    main()
