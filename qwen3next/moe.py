"""The sparse MoE block: a softmax router picks top-k routed experts per token, plus a gated shared expert.

Routed experts are not parameters of this module: they come from an expert store
(qwen3next.offload.store), asked once per layer and forward for just the experts the router
picked, so the store can keep them resident, cache them, prefetch them or quantize them
without this module knowing. Only the selected experts run, each on all the tokens routed to it.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import Qwen3NextConfig
from .layers import SwiGLU


class Expert(Protocol):
    """One routed expert: [N, hidden] -> [N, hidden]."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class ExpertStore(Protocol):
    """Where routed experts live. `layer` is the decoder layer index (MTP layers follow the main ones)."""

    def experts(self, layer: int, ids: Sequence[int]) -> Sequence[Expert]:
        """The experts `ids` of `layer`, ready to run, in the order asked."""
        ...


class SwiGLUExpert(nn.Module):
    """A routed expert with gate and up fused into one [2 * intermediate, hidden] matrix (one matmul, not two)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_up = nn.Parameter(gate_up, requires_grad=gate_up.requires_grad)
        self.down = nn.Parameter(down, requires_grad=down.requires_grad)

    @classmethod
    def from_projections(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> "SwiGLUExpert":
        return cls(torch.cat((gate, up), dim=0), down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


class Routing:
    """The router's decision for N tokens: expert ids and weights [N, k], and the raw logits [N, experts]."""

    __slots__ = ("ids", "weights", "logits")

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor):
        self.ids, self.weights, self.logits = ids, weights, logits


class SparseMoE(nn.Module):
    def __init__(self, config: Qwen3NextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.store: ExpertStore | None = None
        self.last_routing: Routing | None = None  # kept for router statistics and the training loss

    def route(self, x: torch.Tensor) -> Routing:
        """Softmax over all experts in fp32, top-k, renormalised when norm_topk_prob."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(ids, weights.to(logits.dtype), logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.route(x)
        self.last_routing = routing
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (self._routed(x, routing) + shared).view(shape)

    def _routed(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Sum of w * expert(x) over each token's chosen experts, each expert run once on its tokens."""
        flat_ids = routing.ids.flatten()
        order = torch.argsort(flat_ids, stable=True)  # slots grouped by expert
        chosen, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
        experts = self.store.experts(self.layer, chosen.tolist())
        tokens = order // self.top_k
        weights = routing.weights.flatten()[order, None]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(experts, counts.tolist()):
            rows = slice(start, start + count)
            out.index_add_(0, tokens[rows], expert(x[tokens[rows]]) * weights[rows])
            start += count
        return out
