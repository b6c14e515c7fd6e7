"""Paged attention over the block pool, the torch path (any device).

The pool is [num_blocks, layers_per_page, 2, block_size, kv_heads, head_dim]:
one page holds one block of every layer of a group, so a group's whole KV for a
block is contiguous (offloading moves it with one copy). Layers read K/V through
per-group block tables built once per step and shared by the group's layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    q_start: int
    q_end: int
    seq_len: int                       # keys to attend over, from the table's first block on
    block_table: torch.Tensor          # [num_blocks_needed] long
    mask: torch.Tensor | None          # [q_len, seq_len] bool; None: causal from 0 (or a lone decode)


@dataclass
class GroupAttention:
    """Everything one KV cache group's layers need for one step."""
    sliding_window: int | None
    slot_blocks: torch.Tensor          # [T] where each new token's K/V goes
    slot_offsets: torch.Tensor         # [T]
    decode_tokens: torch.Tensor | None = None        # [B] rows of q that are single-token decodes
    # (with the CPU kernel: each sequence's first row, and it has decode_num_queries[b] of them)
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks]
    decode_mask: torch.Tensor | None = None          # [B, 1, 1, L] bool, None when B == 1 and no window
    # With the CPU decode kernel: no padding mask, each row's key range instead.
    decode_kernel: object | None = None
    decode_num_queries: torch.Tensor | None = None   # [B] new tokens: 1 for a decode, more for a short chunk
    decode_seq_lens: torch.Tensor | None = None      # [B] keys up to and including the last new token
    decode_first_pos: torch.Tensor | None = None     # [B] key position of the table's first block
    prefills: list[PrefillSeq] = field(default_factory=list)
    # Arguments for the fused kernel path (CUDA).
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    query_start_loc: torch.Tensor | None = None


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[len(q_pos), len(k_pos)] bool: causal, and within the window if any."""
    diff = q_pos[:, None] - k_pos[None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


def write_kv(kv_cache: torch.Tensor, slot: int, meta: GroupAttention, k: torch.Tensor, v: torch.Tensor) -> None:
    """Rounds K/V to the cache's dtype (--kv-cache-dtype): attention then reads
    the rounded values whether they were computed this step, earlier or loaded."""
    kv_cache[meta.slot_blocks, slot, 0, meta.slot_offsets] = k.to(kv_cache.dtype)
    kv_cache[meta.slot_blocks, slot, 1, meta.slot_offsets] = v.to(kv_cache.dtype)


def paged_attention_torch(q: torch.Tensor, kv_cache: torch.Tensor, slot: int, meta: GroupAttention,
                          scale: float) -> torch.Tensor:
    """q: [T, H, D] -> [T, H, D]; K/V of the new tokens are already in the pool.
    Prefill chunks run SDPA per sequence; decodes go to the C++ kernel when the
    runner attached it (meta.decode_kernel), else one masked SDPA over a gather."""
    out = torch.empty_like(q)
    kvh, d = kv_cache.shape[-2], kv_cache.shape[-1]
    if meta.decode_kernel is not None:
        meta.decode_kernel.paged_decode_attention(
            out, q, kv_cache, slot, meta.decode_tokens, meta.decode_num_queries, meta.decode_block_tables,
            meta.decode_seq_lens,
            meta.decode_first_pos, meta.sliding_window or 0, scale)
    elif meta.decode_tokens is not None:
        bt = meta.decode_block_tables
        b = bt.shape[0]
        k = kv_cache[bt, slot, 0].to(q.dtype).reshape(b, -1, kvh, d).transpose(1, 2)
        v = kv_cache[bt, slot, 1].to(q.dtype).reshape(b, -1, kvh, d).transpose(1, 2)
        qd = q[meta.decode_tokens].unsqueeze(2)  # [B, H, 1, D]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        out[meta.decode_tokens] = o.squeeze(2)
    for p in meta.prefills:
        k = kv_cache[p.block_table, slot, 0].to(q.dtype).reshape(-1, kvh, d)[:p.seq_len].transpose(0, 1).unsqueeze(0)
        v = kv_cache[p.block_table, slot, 1].to(q.dtype).reshape(-1, kvh, d)[:p.seq_len].transpose(0, 1).unsqueeze(0)
        qp = q[p.q_start:p.q_end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qp, k, v, attn_mask=p.mask, is_causal=p.mask is None and p.q_end - p.q_start > 1,
                                           scale=scale, enable_gqa=True)
        out[p.q_start:p.q_end] = o.squeeze(0).transpose(0, 1)
    return out


def paged_attention_fused(q: torch.Tensor, kv_cache: torch.Tensor, slot: int, meta: GroupAttention,
                          scale: float) -> torch.Tensor:
    """The same contract through the Triton kernel: one launch for the whole batch."""
    from kvtier.engine.attention.triton_kernel import paged_attention
    return paged_attention(q, kv_cache, slot, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                           scale, meta.sliding_window)
