"""Turns a scheduled step into tensors, runs the model, samples."""
from __future__ import annotations

import torch

from kvtier.engine.attention.paged import GroupAttention, PrefillSeq, window_mask
from kvtier.engine.core.kv_cache import KVCacheGroup, KVCacheManager, SlidingWindowSpec
from kvtier.engine.core.kv_cache.spec import layers_per_page
from kvtier.engine.core.scheduler import SchedulerOutput
from kvtier.engine.model.causal_lm import CausalLM
from kvtier.engine.model.sampler import sample
from kvtier.kvstore.buffers import advise_huge_pages

# Prefill chunks up to this many tokens go to the CPU kernel with the decodes:
# it reads the pages in place, where SDPA first gathers the whole context. Past
# it SDPA's causal tiling wins (benchmarks/bench_prefill_tail.py).
KERNEL_MAX_QUERIES = 64


def kv_page_bytes(cfg, groups: list[KVCacheGroup], block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return layers_per_page(groups) * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache_manager: KVCacheManager, num_blocks: int, block_size: int,
                 kv_cache_dtype: torch.dtype | None = None):
        self.model = model
        self.kv = kv_cache_manager
        self.groups = kv_cache_manager.groups
        self.block_size = block_size
        cfg = model.cfg
        self.device = model.device
        # Allocated and touched once: first-touch page faults cost 20-50x a warm copy.
        self.kv_cache = torch.empty(num_blocks, layers_per_page(self.groups), 2, block_size,
                                    cfg.num_kv_heads, cfg.head_dim, dtype=kv_cache_dtype or model.dtype,
                                    device=self.device)
        if self.kv_cache.device.type == "cpu":
            # On 4 KiB pages, copying loaded KV into pages that sat idle ran at a
            # quarter of memcpy speed (the kernel re-arms access tracking on every
            # page-table entry); huge pages have 512x fewer. Advised before the first touch.
            advise_huge_pages(self.kv_cache)
        self.kv_cache.zero_()
        self.fused_attention = False  # the engine switches this on with the Triton path
        self.decode_kernel = None     # ... and this one with the CPU decode kernel
        self.layer_slots: list[tuple[int, int]] = [None] * cfg.num_layers
        for g in self.groups:
            for slot, layer in enumerate(g.layers):
                self.layer_slots[layer] = (g.index, slot)

    def _group_attention(self, group: KVCacheGroup, sched: SchedulerOutput, positions: torch.Tensor,
                         masks: dict) -> GroupAttention:
        """`masks` is shared by the step's groups: groups with the same window need the same masks."""
        bs = self.block_size
        window = group.spec.window if isinstance(group.spec, SlidingWindowSpec) else None
        tables = [self.kv.block_ids(s.request.request_id)[group.index] for s in sched.scheduled]
        # Where each new token's K/V goes.
        slot_blocks = []
        for s, table in zip(sched.scheduled, tables):
            c = s.request.num_computed_tokens
            slot_blocks.extend(table[p // bs] for p in range(c, c + s.num_new_tokens))
        slot_blocks_t = torch.tensor(slot_blocks, dtype=torch.long, device=self.device)
        meta = GroupAttention(window, slot_blocks_t, positions % bs)
        if self.fused_attention:
            return self._fused_metadata(meta, sched, tables)

        # With the CPU kernel every decode goes to it, and so does every short
        # prefill chunk (the tail of a prefix hit): it reads the pages in place
        # where SDPA would first gather the whole context. Without it, two or
        # more decodes run as one padded batch; a lone decode takes the
        # per-sequence path, which needs no padding mask.
        kernel = self.decode_kernel
        batch_decodes = kernel is not None or sum(1 for s in sched.scheduled if s.num_new_tokens == 1) >= 2
        most = KERNEL_MAX_QUERIES if kernel is not None else 1
        decode_rows, decode_nq, decode_tables, decode_firsts, decode_lens = [], [], [], [], []
        q_start = 0
        for i, (s, table) in enumerate(zip(sched.scheduled, tables)):
            c, n = s.request.num_computed_tokens, s.num_new_tokens
            seq_len = c + n
            nblk = -(-seq_len // bs)
            # A sliding window reads only from the first block its earliest query can see.
            first = max(0, c - window + 1) // bs if window is not None else 0
            if n <= most and batch_decodes:
                decode_rows.append(q_start)
                decode_nq.append(n)
                decode_tables.append(table[first:nblk])
                decode_firsts.append(first * bs)
                decode_lens.append(seq_len)
            else:
                mask = None
                if (c > 0 and n > 1) or (window is not None and seq_len > window):
                    if (window, i) not in masks:
                        q_pos = torch.arange(c, seq_len, device=self.device)
                        k_pos = torch.arange(first * bs, seq_len, device=self.device)
                        masks[(window, i)] = window_mask(q_pos, k_pos, window)
                    mask = masks[(window, i)]
                bt = torch.tensor(table[first:nblk], dtype=torch.long, device=self.device)
                meta.prefills.append(PrefillSeq(q_start, q_start + n, seq_len - first * bs, bt, mask))
            q_start += n
        if decode_rows:
            width = max(len(t) for t in decode_tables)
            padded = [t + [0] * (width - len(t)) for t in decode_tables]
            meta.decode_tokens = torch.tensor(decode_rows, dtype=torch.long, device=self.device)
            meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=self.device)
            if kernel is not None:
                meta.decode_kernel = kernel
                meta.decode_num_queries = torch.tensor(decode_nq, dtype=torch.long, device=self.device)
                meta.decode_seq_lens = torch.tensor(decode_lens, dtype=torch.long, device=self.device)
                meta.decode_first_pos = torch.tensor(decode_firsts, dtype=torch.long, device=self.device)
                return meta
            if (window, "decode") not in masks:
                q_pos = torch.tensor(decode_lens, device=self.device)[:, None] - 1
                k_pos = (torch.tensor(decode_firsts, device=self.device)[:, None]
                         + torch.arange(width * bs, device=self.device)[None, :])
                valid = k_pos <= q_pos
                if window is not None:
                    valid &= q_pos - k_pos < window
                masks[(window, "decode")] = valid[:, None, None, :]
            meta.decode_mask = masks[(window, "decode")]
        return meta

    def _fused_metadata(self, meta: GroupAttention, sched: SchedulerOutput, tables: list[list[int]]) -> GroupAttention:
        width = max(len(t) for t in tables)
        meta.block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32,
                                         device=self.device)
        lens, starts = [], [0]
        for s in sched.scheduled:
            lens.append(s.request.num_computed_tokens + s.num_new_tokens)
            starts.append(starts[-1] + s.num_new_tokens)
        meta.seq_lens = torch.tensor(lens, dtype=torch.int32, device=self.device)
        meta.query_start_loc = torch.tensor(starts, dtype=torch.int32, device=self.device)
        return meta

    def execute(self, sched: SchedulerOutput) -> tuple[list[int], list]:
        """Runs one step; returns sampled tokens for the requests that complete their
        prompt (or decode) this step, in scheduled order."""
        ids, pos, logits_rows, sampled_reqs = [], [], [], []
        for s in sched.scheduled:
            r, c, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            ids.extend(r.all_token_ids[c:c + n])
            pos.extend(range(c, c + n))
            if s.completes_prompt:
                logits_rows.append(len(ids) - 1)
                sampled_reqs.append(r)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        masks: dict = {}
        metas = [self._group_attention(g, sched, positions, masks) for g in self.groups]
        rows = torch.tensor(logits_rows, dtype=torch.long, device=self.device)
        logits = self.model.forward(input_ids, positions, self.kv_cache, self.layer_slots, metas, rows)
        if not sampled_reqs:
            return [], []
        return sample(logits.cpu(), sampled_reqs)
