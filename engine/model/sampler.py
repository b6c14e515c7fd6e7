"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""
from __future__ import annotations

import torch

from kvtier.engine.core.request import Request


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits: [N, V] float32, row i for requests[i]."""
    greedy = logits.argmax(dim=-1).tolist()
    need_logprobs = any(r.params.logprobs is not None for r in requests)
    logprobs_all = logits.log_softmax(-1) if need_logprobs else None
    tokens, logprobs = [], []
    for i, req in enumerate(requests):
        p = req.params
        if p.greedy:
            tok = greedy[i]
        else:
            row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
            tok = int(torch.multinomial(row.softmax(-1), 1, generator=req.generator).item())
        tokens.append(tok)
        if p.logprobs is not None:
            row_lp = logprobs_all[i]
            entry = {tok: float(row_lp[tok])}
            if p.logprobs > 0:
                top = torch.topk(row_lp, p.logprobs)
                for t, lp in zip(top.indices.tolist(), top.values.tolist()):
                    entry.setdefault(t, lp)
            logprobs.append(entry)
        else:
            logprobs.append(None)
    return tokens, logprobs
