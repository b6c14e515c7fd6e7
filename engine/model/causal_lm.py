"""Llama-family forward pass (Llama, Mistral, Qwen2) over the paged KV pool.

Mirrors HF transformers' arithmetic (float32 RMSNorm, rotate-half RoPE,
separate q/k/v projections) so that greedy decoding matches it token for token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvtier.engine.attention.paged import GroupAttention, paged_attention_torch, write_kv
from kvtier.engine.model.linear import Linear


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight, self.eps = weight, eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class DecoderLayer:
    def __init__(self, w: dict[str, torch.Tensor], prefix: str, cfg, prepack: bool):
        def linear(name):
            return Linear(w[prefix + name + ".weight"], w.get(prefix + name + ".bias"), prepack)
        self.q, self.k, self.v = linear("self_attn.q_proj"), linear("self_attn.k_proj"), linear("self_attn.v_proj")
        self.o = linear("self_attn.o_proj")
        self.gate, self.up, self.down = linear("mlp.gate_proj"), linear("mlp.up_proj"), linear("mlp.down_proj")
        self.input_norm = RMSNorm(w[prefix + "input_layernorm.weight"], cfg.rms_norm_eps)
        self.post_norm = RMSNorm(w[prefix + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim


class CausalLM:
    def __init__(self, cfg, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                 prepack: bool = True):
        w = {k: t.to(device=device, dtype=dtype) for k, t in weights.items()}
        self.cfg = cfg
        self.device, self.dtype = device, dtype
        self.embed = w["model.embed_tokens.weight"]
        self.lm_head = Linear(self.embed if cfg.tie_word_embeddings else w["lm_head.weight"], None, prepack)
        self.norm = RMSNorm(w["model.norm.weight"], cfg.rms_norm_eps)
        self.layers = [DecoderLayer(w, f"model.layers.{i}.", cfg, prepack) for i in range(cfg.num_layers)]
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
        self.scale = cfg.head_dim ** -0.5
        self.attention = paged_attention_torch
        # Layer-wise KV connectors hook in here (wait_for_layer_load / save_kv_layer).
        self.connector = None
        self.connector_meta = None

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                layer_slots: list[tuple[int, int]], groups: list[GroupAttention],
                logits_indices: torch.Tensor) -> torch.Tensor:
        """layer_slots[i] = (group index, slot in page) of layer i. Returns float32 logits
        for the rows in `logits_indices`."""
        cos, sin = self.rope(positions)
        h = F.embedding(input_ids, self.embed)
        t = input_ids.shape[0]
        connector = self.connector
        for i, (layer, (g, slot)) in enumerate(zip(self.layers, layer_slots)):
            x = layer.input_norm(h)
            q = layer.q(x).view(t, layer.num_heads, layer.head_dim)
            k = layer.k(x).view(t, layer.num_kv_heads, layer.head_dim)
            v = layer.v(x).view(t, layer.num_kv_heads, layer.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if connector is not None:
                connector.wait_for_layer_load(i)
            write_kv(kv_cache, slot, groups[g], k, v)
            a = self.attention(q, kv_cache, slot, groups[g], self.scale)
            if connector is not None:
                connector.save_kv_layer(i, self.connector_meta)
            h = h + layer.o(a.reshape(t, -1))
            x = layer.post_norm(h)
            h = h + layer.down(F.silu(layer.gate(x)) * layer.up(x))
        h = self.norm(h[logits_indices])
        return self.lm_head(h).float()
