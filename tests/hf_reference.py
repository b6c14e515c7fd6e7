"""HF transformers as the reference our outputs must match."""
from __future__ import annotations

import torch


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=hf_model.config.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def hf_rope_theta(config) -> float:
    """A transformers config's RoPE base: `rope_theta` in 4.x, `rope_parameters` in 5.x."""
    theta = getattr(config, "rope_theta", None)
    return theta if theta is not None else config.rope_parameters["rope_theta"]
