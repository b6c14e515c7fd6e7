"""Triton paged attention over the engine's block-table KV cache (CUDA path).

One launch serves a whole batch: decode steps (one new token per sequence),
prefill from empty and chunked prefill on top of earlier context, mixed
freely.  The contract is the same as the engine's torch path:

* ``q`` holds this step's new tokens, all sequences concatenated; rows
  ``query_start_loc[s]:query_start_loc[s + 1]`` belong to sequence ``s``.
* ``seq_lens[s]`` counts every token of ``s`` after this step, so the ``j``-th
  new token sits at position ``seq_lens[s] - q_len_s + j``.  Its K/V are
  already in ``kv_cache``.
* Causal attention; with ``sliding_window=W`` a query at ``p`` only sees keys
  ``k`` with ``p - W < k <= p`` (HF transformers semantics).  Block-table
  entries wholly before the window may be ``-1`` and are never read.
* GQA: head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``.

Work decomposition.  A program owns one kv head and a tile of ``BLOCK_Q``
consecutive new tokens of one sequence, and processes the whole query group
of that kv head at once: its ``BLOCK_M = BLOCK_Q * group`` rows are
(token, head) pairs, so each K/V tile is loaded once per group rather than
once per query head.  The grid is sized from host-known shapes only
(``num_tokens // BLOCK_Q + num_seqs`` tiles always suffice, see
``_num_query_tiles``), and each program finds its sequence by binary search
over ``query_start_loc``; nothing syncs with the device and the launch is
CUDA-graph friendly.  Surplus programs exit at once.

Import is safe without triton; ``is_available()`` says whether the kernel
can run.  Under ``TRITON_INTERPRET=1`` (set before triton is first imported)
the kernel runs on CPU tensors through triton's interpreter, which is how it
is tested on machines without a GPU.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine uses its torch path.
    triton = None
    tl = None

__all__ = ["is_available", "paged_attention"]


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """Triton is importable and there is something to run it on."""
    return triton is not None and (torch.cuda.is_available() or _interpret_mode())


def _paged_attention_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim] view of one layer's K
    v_cache_ptr,  # same for V
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    qk_scale,  # softmax scale * log2(e): the softmax is computed with exp2
    window,  # sliding window; ignored unless HAS_WINDOW
    num_seqs,
    stride_q_tok, stride_q_head, stride_q_dim,
    stride_o_tok, stride_o_head, stride_o_dim,
    stride_kv_block, stride_kv_pos, stride_kv_head, stride_kv_dim,  # shared by K and V views
    stride_bt_seq, stride_bt_block,
    QUERIES_PER_KV: tl.constexpr,  # GQA group size
    BLOCK_Q: tl.constexpr,  # new tokens per program
    BLOCK_M: tl.constexpr,  # rows per program: power of two >= BLOCK_Q * QUERIES_PER_KV
    BLOCK_N: tl.constexpr,  # keys per inner iteration
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size (tokens per physical block)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 so TF32 does not eat precision
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)

    # Sequence s owns query tiles starting at query_start_loc[s] // BLOCK_Q + s,
    # a strictly increasing function of s; find the last s whose first tile
    # is <= tile_idx.  lo/hi start as int32 tensors so the loop-carried types
    # never change (triton would specialize num_seqs == 1 to a constant).
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        mid_first_tile = tl.load(query_start_loc_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        go_right = mid_first_tile <= tile_idx
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    seq = lo

    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    local_tile = tile_idx - (q_start // BLOCK_Q + seq)
    if local_tile * BLOCK_Q >= q_len:
        return  # surplus program (see _num_query_tiles)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    context_len = seq_len - q_len

    # Row r of the tile is new token (local_tile * BLOCK_Q + r // QUERIES_PER_KV)
    # attending with query head kv_head * QUERIES_PER_KV + r % QUERIES_PER_KV.
    rows = tl.arange(0, BLOCK_M)
    token = local_tile * BLOCK_Q + rows // QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_ok = (rows < BLOCK_Q * QUERIES_PER_KV) & (token < q_len)
    q_pos = context_len + token

    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM

    q_offs = ((q_start + token) * stride_q_tok + head * stride_q_head)[:, None] + dims[None, :] * stride_q_dim
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    # Keys this tile needs: up to its last query's position and, with a
    # window, from its first query's window start.  Nothing outside
    # [kv_lo, kv_hi) is loaded, so -1 table entries (before the window) and
    # stale cache slots (past seq_len) are never touched.
    kv_hi = tl.minimum(context_len + (local_tile + 1) * BLOCK_Q, seq_len)
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(context_len + local_tile * BLOCK_Q - window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    kv_head_off = kv_head * stride_kv_head
    for key_start in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
        key_pos = key_start + tl.arange(0, BLOCK_N)
        key_ok = (key_pos >= kv_lo) & (key_pos < kv_hi)

        # Per-key block lookup: works for any block size, including ones that
        # do not divide (or are smaller than) BLOCK_N.
        phys_block = tl.load(
            block_tables_ptr + seq * stride_bt_seq + (key_pos // BLOCK_SIZE) * stride_bt_block,
            mask=key_ok,
            other=0,
        ).to(tl.int64)  # int64: block * stride overflows int32 on large caches
        key_offs = phys_block * stride_kv_block + (key_pos % BLOCK_SIZE) * stride_kv_pos + kv_head_off

        k = tl.load(  # loaded transposed: [HEAD_DIM_PAD, BLOCK_N]
            k_cache_ptr + key_offs[None, :] + dims[:, None] * stride_kv_dim,
            mask=key_ok[None, :] & dim_ok[:, None],
            other=0.0,
        ).to(q.dtype)  # a 16-bit cache (--kv-cache-dtype) is widened to q's dtype
        v = tl.load(  # masked slots must read as 0, not whatever is there: 0 * NaN is NaN
            v_cache_ptr + key_offs[:, None] + dims[None, :] * stride_kv_dim,
            mask=key_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(q.dtype)

        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        visible = key_ok[None, :] & (key_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (q_pos[:, None] - key_pos[None, :] < window)
        scores = tl.where(visible, scores, float("-inf"))

        # Online softmax.  A row may see no key in this tile (window start,
        # padding rows); subtracting 0 instead of -inf then keeps p and
        # alpha at 0 rather than NaN.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Every real row sees at least its own key, so l_i > 0 there; the guard
    # only keeps padding rows (never stored) finite.
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_offs = ((q_start + token) * stride_o_tok + head * stride_o_head)[:, None] + dims[None, :] * stride_o_dim
    tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


# Decorated at import: triton.jit chooses interpreter vs. compiler then, and
# the interpreter additionally needs TRITON_INTERPRET=1 before triton itself
# is first imported (triton.language's own jit helpers are decorated then).
_kernel = triton.jit(_paged_attention_kernel) if triton is not None else None


def _num_query_tiles(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Grid size that covers every sequence's query tiles without a device sync.

    Sequence s starts at tile query_start_loc[s] // block_q + s and needs
    ceil(q_len_s / block_q) tiles; since floor(a/B) + ceil(L/B) <=
    floor((a+L)/B) + 1, these ranges are disjoint and all end before
    num_tokens // block_q + num_seqs.
    """
    return num_tokens // block_q + num_seqs


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer_slot: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of this step's new tokens over the paged KV cache.

    Shapes: q [num_tokens, num_heads, head_dim]; kv_cache [num_blocks,
    layers_per_group, 2, block_size, num_kv_heads, head_dim] (index 0 = K,
    1 = V); block_tables [num_seqs, max_blocks]; seq_lens [num_seqs];
    query_start_loc [num_seqs + 1].  Returns [num_tokens, num_heads,
    head_dim] in q's dtype.  See the module docstring for the semantics.
    """
    if triton is None:
        raise RuntimeError("paged_attention needs triton, which is not installed")
    if q.dim() != 3 or kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(
            f"expected q [tokens, heads, head_dim] and kv_cache [blocks, layers, 2, block_size, kv_heads, "
            f"head_dim], got {tuple(q.shape)} and {tuple(kv_cache.shape)}"
        )
    num_tokens, num_heads, head_dim = q.shape
    _, layers_per_group, _, block_size, num_kv_heads, kv_head_dim = kv_cache.shape
    if kv_head_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"q has {num_heads} heads x {head_dim}, kv_cache {num_kv_heads} kv heads x {kv_head_dim}")
    if not 0 <= layer_slot < layers_per_group:
        raise ValueError(f"layer_slot {layer_slot} out of range for {layers_per_group} layers per group")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"inconsistent batch: block_tables {tuple(block_tables.shape)}, seq_lens {tuple(seq_lens.shape)}, "
            f"query_start_loc {tuple(query_start_loc.shape)}"
        )

    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out

    queries_per_kv = num_heads // num_kv_heads
    # Pure decode has one token per sequence, so a tile beyond the query
    # group would be mostly padding; prefill amortizes K/V over more rows.
    # (tl.dot on GPUs wants at least 16 rows.)
    min_rows = 16 if num_tokens == num_seqs else 64
    block_m = max(min_rows, triton.next_power_of_2(queries_per_kv))
    block_q = block_m // queries_per_kv

    k_cache = kv_cache[:, layer_slot, 0]  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache = kv_cache[:, layer_slot, 1]
    assert k_cache.stride() == v_cache.stride()
    seq_lens = seq_lens.contiguous()
    query_start_loc = query_start_loc.contiguous()

    grid = (_num_query_tiles(num_tokens, num_seqs, block_q), num_kv_heads)
    _kernel[grid](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale * math.log2(math.e),
        sliding_window or 0,
        num_seqs,
        *q.stride(),
        *out.stride(),
        *k_cache.stride(),
        *block_tables.stride(),
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=32,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
    )
    return out
