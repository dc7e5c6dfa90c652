"""Gated full attention: every fourth Qwen3-Next layer.

Differences from plain GQA attention: q_proj emits a query and an output gate per head,
interleaved per head ([q_h | gate_h] for each head h, not [all q | all gates]); q and k get a
zero-centered RMSNorm per head before a partial RoPE; the attention output is multiplied by
sigmoid(gate) before o_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import Qwen3NextConfig
from .layers import ZeroCenteredRMSNorm, apply_partial_rotary


class GatedAttention(nn.Module):
    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim * 2, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.q_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        query, gate = self.q_proj(x).view(B, T, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
        query = self.q_norm(query).transpose(1, 2)  # [B, heads, T, head_dim]
        key = self.k_norm(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)).transpose(1, 2)
        value = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        query, key = apply_partial_rotary(query, *cos_sin), apply_partial_rotary(key, *cos_sin)

        past = 0
        if kv is not None:
            past = kv.length
            key, value = kv.append(key, value)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=_causal_mask(T, past, x.device), is_causal=past == 0 and T > 1, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        return self.o_proj(out * torch.sigmoid(gate.reshape(B, T, -1)))


def _causal_mask(new: int, past: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask for `new` queries after `past` cached positions (None where SDPA needs none)."""
    if new == 1 or past == 0:
        return None
    keys = torch.arange(past + new, device=device)
    queries = torch.arange(past, past + new, device=device)
    return keys[None, :] <= queries[:, None]
