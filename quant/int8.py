"""8-bit weights: one symmetric scale per output row.

w[n, k] ~ q[n, k] * scale[n] with q in [-127, 127]. Per-row int8 keeps a transformer's logits
within a fraction of a percent, and it is the layout torch's `_weight_int8pack_mm` consumes.
"""

from __future__ import annotations

import torch


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q int8 [out, in], scale fp32 [out])."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays all zero
    q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)
