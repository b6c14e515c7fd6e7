"""Triton paged attention against a plain torch reference.

On CUDA the kernel runs in-process.  Without a GPU it runs under triton's
interpreter on CPU tensors, which needs TRITON_INTERPRET=1 *before triton is
first imported*; other tests (or engine modules they import) may already
have imported triton in this pytest process, so the kernel runs in one
subprocess (this file run as a script) that writes its outputs to a file.
Inputs are seeded, so both processes build identical batches; the
comparison with the reference always happens here.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parent.parent
USE_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if USE_CUDA else "cpu"

BLOCK_SIZE = 16
LAYERS_PER_GROUP = 2
LAYER_SLOT = 1  # not 0, so slot indexing is exercised
# name: (q and out, the cache); the last is a 16-bit cache under a float32 model (--kv-cache-dtype).
DTYPES = {"fp32": (torch.float32, torch.float32), "fp16": (torch.float16, torch.float16),
          "fp32_fp16cache": (torch.float32, torch.float16)}
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3)}

SMOLLM2 = dict(num_heads=9, num_kv_heads=3, head_dim=64)  # GQA ratio 3
MHA = dict(num_heads=4, num_kv_heads=4, head_dim=32)  # ratio 1
WINDOW = 20

# id: (seqs as (context_len, q_len), head config, sliding window, unmap blocks before the window)
CASES = {
    "decode": ([(17, 1), (40, 1), (0, 1), (63, 1)], SMOLLM2, None, False),
    "prefill_from_empty": ([(0, 21), (0, 7)], SMOLLM2, None, False),
    "chunked_prefill": ([(33, 12), (16, 16)], MHA, None, False),
    "mixed": ([(25, 1), (0, 13), (40, 9), (7, 1)], SMOLLM2, None, False),
    # Window < context: leading blocks are -1.  (10, 3) stays inside the window.
    "sliding_window": ([(50, 1), (45, 8), (10, 3)], SMOLLM2, WINDOW, True),
    # Same batch with every block mapped: only the in-kernel mask applies the window.
    "sliding_window_all_mapped": ([(50, 1), (45, 8), (10, 3)], SMOLLM2, WINDOW, False),
}
JOBS = [(case, dtype) for case in CASES for dtype in DTYPES]


@dataclass
class Batch:
    q: torch.Tensor
    kv_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float
    window: int | None


def make_batch(case: str, dtype_name: str, device: str = DEVICE) -> Batch:
    """Deterministic inputs for one case.

    Physical blocks are handed out in shuffled order.  Everything the kernel
    must not read is NaN: the other layer slot, slots past seq_len, unused
    blocks and, when unmapped, blocks wholly before the window (table entry
    -1).  One stray read shows up as NaN in the output.
    """
    seqs, heads, window, unmap_before_window = CASES[case]
    dtype, kv_dtype = DTYPES[dtype_name]
    num_heads, num_kv_heads, head_dim = heads["num_heads"], heads["num_kv_heads"], heads["head_dim"]
    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = [math.ceil((c + n) / BLOCK_SIZE) for c, n in seqs]
    max_blocks = max(blocks_per_seq) + 1  # +1: trailing -1 padding
    num_blocks = sum(blocks_per_seq) + 3  # a few never-used blocks
    free = torch.randperm(num_blocks, generator=gen).tolist()

    kv_cache = torch.full(
        (num_blocks, LAYERS_PER_GROUP, 2, BLOCK_SIZE, num_kv_heads, head_dim), float("nan"), dtype=kv_dtype
    )
    block_tables = torch.full((len(seqs), max_blocks), -1, dtype=torch.int32)
    for s, (context_len, q_len) in enumerate(seqs):
        seq_len = context_len + q_len
        # The first new token's window starts here; the engine frees earlier blocks.
        first_needed = max(0, context_len - window + 1) if unmap_before_window else 0
        for logical in range(first_needed // BLOCK_SIZE, blocks_per_seq[s]):
            phys = free.pop()
            block_tables[s, logical] = phys
            filled = min(BLOCK_SIZE, seq_len - logical * BLOCK_SIZE)
            kv_cache[phys, LAYER_SLOT, :, :filled] = torch.randn(2, filled, num_kv_heads, head_dim, generator=gen)

    q_lens = [n for _, n in seqs]
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    return Batch(
        q=q.to(device),
        kv_cache=kv_cache.to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor([c + n for c, n in seqs], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
        window=window,
    )


def reference_attention(b: Batch, window: int | None) -> torch.Tensor:
    """Per sequence: gather the needed K/V, build the mask explicitly, softmax in float32."""
    q, kv = b.q.cpu(), b.kv_cache.cpu()[:, LAYER_SLOT]
    tables, seq_lens, starts = b.block_tables.cpu(), b.seq_lens.tolist(), b.query_start_loc.tolist()
    group = q.shape[1] // kv.shape[3]
    out = torch.empty_like(q)
    for s, seq_len in enumerate(seq_lens):
        q_s = q[starts[s] : starts[s + 1]].float()  # [q_len, heads, dim]
        q_pos = torch.arange(seq_len - q_s.shape[0], seq_len)
        first_key = max(0, int(q_pos[0]) - window + 1) if window else 0
        key_pos = torch.arange(first_key, seq_len)
        blocks = tables[s, key_pos // BLOCK_SIZE].long()
        assert (blocks >= 0).all(), "test setup: a needed block is unmapped"
        k = kv[blocks, 0, key_pos % BLOCK_SIZE].float().repeat_interleave(group, dim=1)  # [keys, heads, dim]
        v = kv[blocks, 1, key_pos % BLOCK_SIZE].float().repeat_interleave(group, dim=1)

        visible = key_pos[None, :] <= q_pos[:, None]
        if window:
            visible &= q_pos[:, None] - key_pos[None, :] < window
        scores = torch.einsum("qhd,khd->hqk", q_s, k) * b.scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[starts[s] : starts[s + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def run_kernel_jobs() -> dict[tuple[str, str], torch.Tensor]:
    from kvtier.engine.attention import triton_kernel

    assert triton_kernel.is_available()
    outputs = {}
    for case, dtype_name in JOBS:
        b = make_batch(case, dtype_name)
        out = triton_kernel.paged_attention(
            b.q, b.kv_cache, LAYER_SLOT, b.block_tables, b.seq_lens, b.query_start_loc, b.scale, b.window
        )
        outputs[case, dtype_name] = out.cpu()
    return outputs


@pytest.fixture(scope="module")
def kernel_outputs(tmp_path_factory) -> dict[tuple[str, str], torch.Tensor]:
    if USE_CUDA:
        return run_kernel_jobs()
    path = tmp_path_factory.mktemp("triton_attention") / "outputs.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, __file__, str(path)], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(path)


@pytest.mark.parametrize("case,dtype_name", JOBS, ids=[f"{c}-{d}" for c, d in JOBS])
def test_matches_reference(kernel_outputs, case, dtype_name):
    b = make_batch(case, dtype_name)
    out = kernel_outputs[case, dtype_name]
    assert out.shape == b.q.shape and out.dtype == b.q.dtype
    assert not out.isnan().any(), "read a slot it must not read (NaN-filled)"
    torch.testing.assert_close(out, reference_attention(b, b.window), **TOLERANCE[b.q.dtype])


def test_window_is_not_vacuous():
    """The window cases must actually drop keys, or they prove nothing."""
    b = make_batch("sliding_window_all_mapped", "fp32")
    assert not torch.allclose(reference_attention(b, WINDOW), reference_attention(b, None))


if __name__ == "__main__":  # interpreter subprocess: python tests/test_triton_attention.py OUT
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    torch.save(run_kernel_jobs(), sys.argv[1])
