"""The C++ decode-attention kernel against a plain torch reference, and the pure
torch path (KVTIER_ATTENTION=torch) against HF end to end."""
from __future__ import annotations

import math

import pytest
import torch

from kvtier.engine.attention import cpu_kernel
from kvtier.engine.config import EngineConfig
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.entrypoints.llm import LLM
from kvtier.engine.llm_engine import LLMEngine

from hf_reference import hf_greedy

BS = 16
kernel = cpu_kernel.load()
needs_kernel = pytest.mark.skipif(kernel is None, reason="the CPU kernel could not be built here (no compiler?)")


def reference(q, kv, slot, rows, nqs, tables, lens, firsts, window, scale):
    """Per query row: gather the keys it sees by position, softmax(q k^T) v in float64."""
    out = torch.full_like(q, float("nan"), dtype=torch.float64)
    kvh = kv.shape[4]
    for b in range(len(rows)):
        for r in range(nqs[b]):
            at = lens[b] - nqs[b] + r  # this row's own position: it sees keys up to it
            start = max(firsts[b], at - window + 1) if window else firsts[b]
            pos = torch.arange(start, at + 1)
            blk = torch.tensor(tables[b])[(pos - firsts[b]) // BS]
            off = (pos - firsts[b]) % BS
            k = kv[blk, slot, 0, off].double()            # [n, kvh, d]
            v = kv[blk, slot, 1, off].double()
            qb = q[rows[b] + r].double().view(kvh, -1, q.shape[-1])  # [kvh, g, d]
            s = torch.einsum("hgd,nhd->hgn", qb, k) * scale
            o = torch.einsum("hgn,nhd->hgd", s.softmax(-1), v)
            out[rows[b] + r] = o.reshape(-1, q.shape[-1])
    return out


CASES = {
    # (lens, firsts (multiples of BS), heads, kv heads, head_dim, window, query rows each (None: 1, decodes))
    "gqa": ([17, 40, 1, 63, 300], [0, 0, 0, 0, 0], 9, 3, 64, 0, None),
    "mha": ([5, 33, 16], [0, 0, 0], 4, 4, 32, 0, None),
    "window_trimmed_table": ([50, 45, 10, 200], [16, 16, 0, 176], 9, 3, 64, 20, None),
    "window_full_table": ([50, 45, 10], [0, 0, 0], 9, 3, 64, 20, None),
    # Past the kernel's 512-key chunk: one sequence split across tasks, merged after.
    "long_split": ([1300, 2049, 512, 513], [0, 0, 0, 0], 9, 3, 64, 0, None),
    "long_window": ([1800, 700], [560, 0], 9, 3, 64, 1100, None),
    # Short prefill chunks beside decodes: causal among their own rows; the
    # 1300-key one has rows on both sides of a chunk edge (1024); the 20-row
    # one is a whole prompt from position 0.
    "short_chunks": ([40, 300, 1300, 20, 77], [0, 0, 0, 0, 0], 9, 3, 64, 0, [16, 5, 32, 20, 1]),
    "short_chunks_window": ([50, 200, 530], [16, 160, 0], 9, 3, 64, 20, [8, 16, 30]),
    # Longer chunks (the GEMM form of a task): rows across a chunk edge, a window
    # that cuts every row's keys at a different place, one head per kv head.
    "wide_chunks": ([64, 600, 2100], [0, 0, 0], 9, 3, 64, 0, [64, 40, 64]),
    "wide_chunks_window": ([700, 300], [0, 112], 9, 3, 64, 100, [64, 50]),
    "mha_chunks": ([40, 530, 9], [0, 0, 0], 4, 4, 32, 0, [8, 12, 2]),
}
# (q and out, cache): the model's dtype, and a 16-bit cache under a float32 model.
DTYPES = {"f32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "f32_f16cache": (torch.float32, torch.float16), "f32_bf16cache": (torch.float32, torch.bfloat16)}


@needs_kernel
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case, dtypes):
    lens, firsts, h, kvh, d, window, nqs = CASES[case]
    nqs = nqs or [1] * len(lens)
    dtype, kv_dtype = DTYPES[dtypes]
    gen = torch.Generator().manual_seed(0)
    nblocks = [math.ceil((n - f) / BS) for n, f in zip(lens, firsts)]
    num_blocks = sum(nblocks) + 4
    # NaN everywhere the kernel must not read: other slots, unused blocks, slots past each length.
    kv = torch.full((num_blocks, 2, 2, BS, kvh, d), float("nan"), dtype=kv_dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n, f, nb in zip(lens, firsts, nblocks):
        table = perm[used:used + nb]
        used += nb
        for j, blk in enumerate(table):
            valid = min(BS, n - f - j * BS)
            kv[blk, 1, :, :valid] = torch.randn(2, valid, kvh, d, generator=gen).to(kv_dtype)
        tables.append(table)
    width = max(nblocks)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    # Each sequence's rows, with a row the kernel must leave alone before each.
    starts, t_rows = [], 1
    for nq in nqs:
        starts.append(t_rows)
        t_rows += nq + 1
    rows = torch.tensor(starts)
    q = torch.randn(t_rows, h, d, generator=gen).to(dtype)
    out = torch.full_like(q, 7.0)
    scale = d ** -0.5
    kernel.paged_decode_attention(out, q, kv, 1, rows, torch.tensor(nqs), padded, torch.tensor(lens),
                                  torch.tensor(firsts), window, scale)
    want = reference(q, kv, 1, starts, nqs, tables, lens, firsts, window, scale)
    mine = torch.tensor([s + r for s, nq in zip(starts, nqs) for r in range(nq)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # the reference reads the same rounded cache
    torch.testing.assert_close(out[mine].double(), want[mine], atol=tol, rtol=tol)
    untouched = torch.ones(t_rows, dtype=torch.bool)
    untouched[mine] = False
    assert (out[untouched] == 7.0).all()


def test_torch_path_matches_hf(monkeypatch, default_model, hf_reference):
    """The kernel is the CPU default; the pure torch decode path must stay right too."""
    monkeypatch.setenv("KVTIER_ATTENTION", "torch")
    engine = LLMEngine(EngineConfig(), loaded=default_model)
    assert engine.runner.decode_kernel is None
    prompts = ["The capital of France is", "def fibonacci(n):", "List three colours: red, green and"]
    outs = LLM.from_engine(engine).generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf_reference, default_model.tokenizer(p).input_ids, 8)


def test_unknown_attention_choice_is_rejected(monkeypatch, default_model):
    monkeypatch.setenv("KVTIER_ATTENTION", "flash")
    with pytest.raises(ValueError, match="KVTIER_ATTENTION"):
        LLMEngine(EngineConfig(), loaded=default_model)


@needs_kernel
@pytest.mark.parametrize("bad", ["first_past_len", "table_too_short", "block_out_of_range", "slot",
                                 "rows_past_q", "first_past_earliest_query"])
def test_kernel_refuses_indices_that_would_read_outside_the_pool(bad):
    kv = torch.zeros(4, 2, 2, BS, 1, 8)
    q, out = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)
    rows, nq, lens, firsts = torch.tensor([0]), torch.tensor([1]), torch.tensor([20]), torch.tensor([0])
    tables, slot = torch.tensor([[1, 2]]), 0
    if bad == "first_past_len":
        firsts = torch.tensor([32])
    elif bad == "table_too_short":
        tables = torch.tensor([[1]])
    elif bad == "block_out_of_range":
        tables = torch.tensor([[1, 9]])
    elif bad == "rows_past_q":
        nq = torch.tensor([2])  # a second query row that q does not have
    elif bad == "first_past_earliest_query":
        q, out, nq, firsts = torch.zeros(8, 2, 8), torch.zeros(8, 2, 8), torch.tensor([8]), torch.tensor([16])
    else:
        slot = 2
    with pytest.raises(RuntimeError):
        kernel.paged_decode_attention(out, q, kv, slot, rows, nq, tables, lens, firsts, 0, 1.0)
