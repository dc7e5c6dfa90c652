"""Prefetch: start reading layer L+1's likely experts while layer L computes.

Two signals, both cheap next to a disk read:
  gating  layer L+1's router applied to layer L's MoE input (the residual stream changes little
          between neighbouring layers, so this recalls most of L+1's choice; ../docs/performance.md)
  stats   the experts of L+1 that the router statistics say follow the ones L just chose
The top `top_k + extra` gating candidates go first, then the statistics' guesses. What is
prefetched changes only what is read early, never the output.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

Predictor = Callable[[int, torch.Tensor, int], Sequence[int]]  # (layer, ids of layer, n) -> experts of the next


class Prefetcher:
    def __init__(self, routers: dict[int, nn.Module], top_k: int, extra: int = 4,
                 statistics: Predictor | None = None, gating: bool = True):
        self.routers = routers
        self.next_layer = dict(zip(sorted(routers)[:-1], sorted(routers)[1:]))
        self.top_k, self.extra = top_k, extra
        self.statistics, self.gating = statistics, gating

    def candidates(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> tuple[int, list[int]] | None:
        """(next layer, experts to read ahead) for one decode-sized step at `layer`, or None."""
        following = self.next_layer.get(layer)
        if following is None:
            return None
        chosen: list[int] = []
        if self.gating:
            with torch.inference_mode():
                logits = self.routers[following](x)
            n = min(self.top_k + self.extra, logits.shape[-1])
            chosen += torch.topk(logits.float(), n, dim=-1).indices.flatten().tolist()
        if self.statistics is not None:
            chosen += list(self.statistics(layer, ids, self.top_k))
        return following, list(dict.fromkeys(chosen))
