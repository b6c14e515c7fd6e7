"""Tiny random models built with HF transformers and saved for kvtier to load:
a hybrid Qwen2 (sliding and full layers), an all-sliding Mistral, a plain Llama."""
from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("qwen2-hybrid", "mistral-all-sliding", "llama-full")


def tiny_hf(kind: str, window: int = 32, layers: int = 4, seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )
    common = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
                  # A wide init keeps logits peaked, so greedy choices are not near-ties.
                  initializer_range=0.2)
    torch.manual_seed(seed)
    if kind == "qwen2-hybrid":
        cfg = Qwen2Config(use_sliding_window=True, max_window_layers=layers // 2, sliding_window=window,
                          layer_types=["sliding_attention", "full_attention"] * (layers // 2), **common)
        return Qwen2ForCausalLM(cfg).eval()
    if kind == "mistral-all-sliding":
        return MistralForCausalLM(MistralConfig(sliding_window=window, **common)).eval()
    if kind == "llama-full":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    raise ValueError(kind)


def save_tiny(kind: str, path: Path, tokenizer, **kw):
    """The HF model, saved with `tokenizer` to `path`; returns (hf model, kvtier LoadedModel)."""
    from kvtier.engine.model.loader import load_model
    hf = tiny_hf(kind, **kw)
    hf.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return hf, load_model(str(path), torch.float32)
