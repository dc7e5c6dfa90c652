"""Expert stores: where the MoE blocks get their routed experts from.

The protocol (qwen3next.moe.ExpertStore) is one call, `experts(layer, ids)`, made once per
layer and forward with just the experts the router chose. This module has the simplest store,
everything resident on one device; the tiered GPU / RAM / disk cache with router-statistics
prefetch implements the same call.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from qwen3next.moe import SwiGLUExpert

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def expert_tensor_name(prefix: str, expert: int, projection: str) -> str:
    """The hub's name for one projection of one routed expert under a layer prefix ("model.layers.3")."""
    return f"{prefix}.mlp.experts.{expert}.{projection}.weight"


class ResidentExpertStore:
    """All routed experts held in memory on one device, as fused SwiGLU experts."""

    def __init__(self, layers: dict[int, list[SwiGLUExpert]]):
        self._layers = layers

    @classmethod
    def from_tensors(
        cls,
        layer_prefixes: dict[int, str],
        num_experts: int,
        read: Callable[[str], torch.Tensor],
        progress: Callable[[int], None] = lambda n: None,
    ) -> "ResidentExpertStore":
        """Build from a tensor reader (name -> tensor already in the wanted dtype and device).

        `layer_prefixes` maps expert-store layer ids to checkpoint prefixes, e.g.
        {0: "model.layers.0", ..., 48: "mtp.layers.0"}.
        """
        layers = {}
        for layer, prefix in layer_prefixes.items():
            experts = []
            for e in range(num_experts):
                gate, up, down = (read(expert_tensor_name(prefix, e, p)) for p in PROJECTIONS)
                experts.append(SwiGLUExpert.from_projections(gate, up, down).requires_grad_(False))
                progress(1)
            layers[layer] = experts
        return cls(layers)

    def experts(self, layer: int, ids: Sequence[int]) -> list[SwiGLUExpert]:
        experts = self._layers[layer]
        return [experts[i] for i in ids]

    def parameters(self) -> Iterable[torch.Tensor]:
        for experts in self._layers.values():
            for expert in experts:
                yield from expert.parameters()

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())
