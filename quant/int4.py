"""4-bit weights: groups of `group` consecutive input weights share an fp16 scale and minimum.

w[n, g*G + i] ~ q * scale[n, g] + minimum[n, g] with q in [0, 15] (asymmetric: a group's range
is used whole). Two codes per byte, the even index in the low nibble: packed [out, in / 2]. With
G = 64 that is 4.5 bits per weight. The quantizer rounds with the fp16 scale and minimum it
stores, so dequantizing reproduces exactly what was measured.
"""

from __future__ import annotations

import torch

DEFAULT_GROUP = 64


def group_for(in_features: int, group: int = DEFAULT_GROUP) -> int:
    """The largest even group size <= `group` that divides a row of `in_features` (narrow rows, like the
    demo model's 56-wide expert down projections, get one smaller group per row)."""
    fitting = [g for g in range(min(group, in_features), 1, -1) if in_features % g == 0 and g % 2 == 0]
    if not fitting:
        raise ValueError(f"a row of {in_features} weights cannot be split into even-sized groups")
    return fitting[0]


def quantize(weight: torch.Tensor, group: int = DEFAULT_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (packed uint8 [out, in/2], scale fp16 [out, in/group], minimum fp16 [out, in/group])."""
    out_features, in_features = weight.shape
    if in_features % group or group % 2:
        raise ValueError(f"input size {in_features} is not a multiple of the group size {group} (which must be even)")
    w = weight.float().view(out_features, in_features // group, group)
    low, high = torch.aminmax(w, dim=-1)
    minimum = low.half()
    scale = ((high - minimum.float()) / 15).half()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    q = (w - minimum.float()[..., None]).div_(scale.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    q = q.view(out_features, in_features)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale, minimum


def dequantize(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    out_features, half = packed.shape
    groups = scale.shape[1]
    q = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(out_features, groups, 2 * half // groups).float()
    return (q * scale.float()[..., None] + minimum.float()[..., None]).view(out_features, 2 * half).to(dtype)
