"""Small building blocks shared by the attention, DeltaNet and MoE layers.

Qwen3-Next has two RMSNorm flavours and mixing them up is the classic bug: most norms store
w near 0 and scale by (1 + w) ("zero-centered", for training stability); the gated norm inside
Gated DeltaNet stores w near 1 and scales by w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, in fp32 (callers cast back)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose effective scale is (1 + weight), applied in fp32 before casting back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm scaled by weight (not 1 + weight), then gated by silu(z).

    The order of casts follows the reference: normalise in fp32, cast, scale by the weight in
    the activation dtype, multiply by silu(z) in fp32, cast.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        normed = self.weight * rms_normalize(x, self.eps).to(x.dtype)
        return (normed * F.silu(z.float())).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the shared expert (and dense MLP layers, if a config has any)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PartialRotary:
    """Cos/sin tables for RoPE on the first `rotary_dim` dims of each head; the rest pass through.

    Frequencies are computed per call on the positions' device (a handful of tiny ops per
    forward) so the model can be built on the meta device without buffers to repair.
    """

    def __init__(self, rotary_dim: int, theta: float):
        self.rotary_dim = rotary_dim
        self.theta = theta

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [T, rotary_dim] for integer positions [T], in the activation dtype."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=positions.device) / self.rotary_dim
        inv_freq = 1.0 / self.theta**exponents
        freqs = positions.float()[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, heads, T, head_dim] (rotate-half pairing)."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated_half * sin, rest), dim=-1)
