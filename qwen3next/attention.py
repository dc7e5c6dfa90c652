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

from . import cpu_kernels
from .cache import KVCache
from .config import Qwen3NextConfig
from .layers import Linear, ZeroCenteredRMSNorm, apply_partial_rotary, kernel_matrix


class GatedAttention(nn.Module):
    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.heads * self.head_dim * 2)
        self.k_proj = Linear(hidden, self.kv_heads * self.head_dim)
        self.v_proj = Linear(hidden, self.kv_heads * self.head_dim)
        self.o_proj = Linear(self.heads * self.head_dim, hidden)
        self.q_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv: KVCache | None,
        as_steps: bool = False,
    ) -> torch.Tensor:
        """as_steps: each of the T queries attends alone over the keys up to its own position, as a one-token
        step would (speculative verification); otherwise T > 1 queries share one causal SDPA call."""
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
        if T == 1:
            out = self._attend_one(query, key, value)
        elif as_steps:
            length = key.shape[2] - T
            out = torch.cat([self._attend_one(query[:, :, t : t + 1], key[:, :, : length + t + 1],
                                              value[:, :, : length + t + 1]) for t in range(T)], dim=2)
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=_causal_mask(T, past, x.device), is_causal=past == 0, enable_gqa=True
            )
        out = out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        return self.o_proj(out * torch.sigmoid(gate.reshape(B, T, -1)))

    def layer_kernel(self, norms: cpu_kernels.LayerNorms, norm_tensors: list[torch.Tensor], rotary_dim: int):
        """The decoder layer's norm, this mixer and the residual as one kernel call (csrc/layer_kernels.c), as
        GatedDeltaNet.layer_kernel: step(x, cos_sin, kv, keep) and the LayerKernel, or None."""
        matrices = [kernel_matrix(m) for m in (self.q_proj, self.k_proj, self.v_proj, self.o_proj)]
        vectors = [self.q_norm.weight, self.k_norm.weight]
        if None in matrices or rotary_dim % 2 or rotary_dim > self.head_dim or any(
                v.dtype != torch.bfloat16 or v.device.type != "cpu" for v in vectors):
            return None
        struct = cpu_kernels.AttentionLayer(norms, *(m for m, _ in matrices), *(v.data_ptr() for v in vectors),
                                            self.heads, self.kv_heads, self.head_dim, rotary_dim, self.head_dim**-0.5)
        kernel = cpu_kernels.LayerKernel(struct, norm_tensors + vectors + [a for _, arrays in matrices for a in arrays])
        self.key_shape = torch.empty(1, self.kv_heads, 0, self.head_dim, dtype=torch.bfloat16)  # what kv holds

        def step(x: torch.Tensor, cos_sin, kv: KVCache, keep: bool):
            past, T = kv.length, x.shape[1]
            kv.reserve(self.key_shape, T)
            cos, sin = (table.contiguous() for table in cos_sin)
            out = cpu_kernels.attention_layer_bf16(kernel, x, cos, sin, kv.keys, kv.values, past)
            kv.length = past + T
            return out
        return step, kernel

    def _attend_one(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """One query per head over all cached keys: plain matmuls, several times faster than SDPA at decode.

        Query heads sharing a kv head are stacked as rows, so GQA needs no repeated keys. One bf16 sequence
        on the CPU takes the kernel.
        """
        B, _, _, D = query.shape
        if B == 1 and cpu_kernels.usable(query):
            return cpu_kernels.attend_one_bf16(query, key, value)
        grouped = query.view(B, self.kv_heads, self.heads // self.kv_heads, D)
        scores = (grouped @ key.transpose(-1, -2)) * D**-0.5  # [B, kv_heads, group, S]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        return (probs @ value).view(B, self.heads, 1, D)


def _causal_mask(new: int, past: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask for `new` queries after `past` cached positions (None where SDPA needs none)."""
    if new == 1 or past == 0:
        return None
    keys = torch.arange(past + new, device=device)
    queries = torch.arange(past, past + new, device=device)
    return keys[None, :] <= queries[:, None]
