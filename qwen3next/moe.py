"""The sparse MoE block: a softmax router picks top-k routed experts per token, plus a gated shared expert.

Routed experts are not parameters of this module: they live in an expert store
(qwen3next.offload.store), which is asked once per layer and forward to run just the experts
the router picked, so the store can keep them resident, cache them, prefetch them or quantize
them without this module knowing. Only the selected experts run, each on all its tokens.
"""

from __future__ import annotations

import ctypes
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .config import Qwen3NextConfig
from .layers import Linear, SwiGLU, kernel_matrix


class ExpertStore(Protocol):
    """Where routed experts live and run. `layer` is the decoder layer index (MTP layers follow the main ones).

    A store decides how to compute what the router chose: a resident store runs fused kernels,
    an offloading one fetches or prefetches weights first. A store that returns an address table
    takes the fast path for one-token bf16 CPU steps and is not called through `run` for them
    (the router's choices are still in SparseMoE.last_routing); it is asked to acquire() the chosen
    experts first unless all_resident.
    """

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[n, k] * expert_{ids[n, k]}(x[n]) for x [N, hidden], ids and weights [N, k]."""
        ...

    def address_table(self, layer: int) -> torch.Tensor | None:
        """[experts, 3] addresses of every expert's gate/up/down bf16 CPU weights (valid for all experts when
        all_resident, else for those acquire() made resident).

        With it the MoE block of a decode step runs as CPU kernel calls (one when all_resident, else
        routing and experts around acquire/release); None means "route, then call run()" (not bf16 on the CPU).
        """
        ...

    def quantized_table(self, layer: int) -> "tuple[torch.Tensor, cpu_kernels.ExpertLayout] | None":
        """For quantized experts on the CPU, what address_table is for bf16 ones: the [experts] blob addresses
        (valid as address_table's are) and the blobs' C layout; None otherwise."""
        ...

    @property
    def all_resident(self) -> bool:
        """Every routed expert is in memory for good: acquire/release have nothing to do."""
        ...

    def acquire(self, layer: int, ids: torch.Tensor, x: torch.Tensor) -> None:
        """Make the experts one token chose (ids [1, k]) resident until release(); x [1, hidden] is the
        token's MoE input, for a prefetcher looking ahead."""
        ...

    def release(self, layer: int, ids: torch.Tensor) -> None:
        ...


class RoutingObserver(Protocol):
    """Sees every MoE block's routing, whichever path computed it: router statistics, expert prefetch.

    Set with set_routing_observer(). It must only read what it is given: the model's output
    never depends on it. Rows are tokens in sequence order (the engine runs one sequence).
    """

    needs_hidden: bool  # whether before_routing uses x; if not, a whole decode step may run in one C call
    # (whole_step.py) and before_routing is not called for its layers. Observers without it count as True.

    def before_routing(self, layer: int, x: torch.Tensor) -> None:
        """x [N, hidden] is about to be routed by `layer` (a prefetcher can apply layer + 1's router to it)."""
        ...

    def routed(self, layer: int, ids: torch.Tensor) -> None:
        """`layer` chose ids [N, k] (int64, in the router's order) for x's N tokens; nobody modifies ids later,
        so an observer may keep them rather than copy."""
        ...


class RoutingObservers:
    """Several routing observers as one, called in order (the router statistics and the expert prefetcher);
    None entries are left out."""

    def __init__(self, *observers: RoutingObserver | None):
        self.observers = [observer for observer in observers if observer is not None]

    @property
    def needs_hidden(self) -> bool:
        return any(getattr(observer, "needs_hidden", True) for observer in self.observers)

    def before_routing(self, layer: int, x: torch.Tensor) -> None:
        for observer in self.observers:
            observer.before_routing(layer, x)

    def routed(self, layer: int, ids: torch.Tensor) -> None:
        for observer in self.observers:
            observer.routed(layer, ids)


def set_routing_observer(model: nn.Module, observer: RoutingObserver | None) -> None:
    """Report every SparseMoE's routing in `model` (MTP layers included) to `observer`; None detaches."""
    for module in model.modules():
        if isinstance(module, SparseMoE):
            module.observer = observer


class StackedExperts(nn.Module):
    """All routed experts of one layer as two tensors: gate|up [E, 2I, H] (one matmul, not two) and down [E, H, I].

    Tokens are grouped by expert and each chosen expert runs once on its group, through one
    grouped matmul where torch has it (a plain loop when autograd is on: its CPU backward fails).
    """

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_up = nn.Parameter(gate_up, requires_grad=gate_up.requires_grad)
        self.down = nn.Parameter(down, requires_grad=down.requires_grad)

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[-1]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        top_k = ids.shape[-1]
        order = torch.argsort(ids.flatten(), stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(ids.flatten(), minlength=self.gate_up.shape[0])
        tokens = order // top_k
        grouped = x[tokens]  # each token once per expert that chose it
        if _GROUPED_MM and not torch.is_grad_enabled():
            ends = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(grouped, self.gate_up.transpose(-2, -1), offs=ends).chunk(2, dim=-1)
            results = torch._grouped_mm(F.silu(gate) * up, self.down.transpose(-2, -1), offs=ends)
        else:
            results = torch.cat([self._one(e, part) for e, part in enumerate(grouped.split(counts.tolist())) if len(part)])
        results = results * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, results.to(x.dtype))  # autocast may compute in bf16

    def _one(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[expert])


_GROUPED_MM = hasattr(torch, "_grouped_mm")


class Routing:
    """The router's decision for N tokens: expert ids and weights [N, k], and the raw logits [N, experts].

    (The fused CPU decode path reports weights and logits in fp32, the torch path in the model dtype.)
    """

    __slots__ = ("ids", "weights", "logits")

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor):
        self.ids, self.weights, self.logits = ids, weights, logits

    @staticmethod
    def concat(routings: "Sequence[Routing]") -> "Routing":
        """The routings of consecutive tokens as one."""
        return Routing(*(torch.cat([getattr(r, name) for r in routings]) for name in Routing.__slots__))


class SparseMoE(nn.Module):
    def __init__(self, config: Qwen3NextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.intermediate_size = config.moe_intermediate_size
        self.gate = Linear(config.hidden_size, config.num_experts)
        self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(config.hidden_size, 1)
        self.store: ExpertStore | None = None
        self.last_routing: Routing | None = None  # kept for router statistics and the training loss
        self.observer: RoutingObserver | None = None
        self._fused = None  # (the store it was built for, cpu_kernels.LayerKernel or None): _fused_weights

    def route(self, x: torch.Tensor) -> Routing:
        """Softmax over all experts in fp32, top-k, renormalised when norm_topk_prob.

        Renormalised top-k probabilities equal a softmax over just the top-k logits, which is
        what is computed then (the same numbers to fp32 rounding, in fewer steps).
        """
        logits = self.gate(x)
        if self.norm_topk_prob:
            top_logits, ids = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
        else:
            weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        return Routing(ids, weights.to(logits.dtype), logits)

    def forward(self, x: torch.Tensor, as_steps: bool = False) -> torch.Tensor:
        """as_steps: each token gets the bits it gets alone, for a speculative verify pass: the fused kernel
        (one call for all tokens when every expert is resident, else token by token); the other path's
        kernels compute each row alone already."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        observer = self.observer
        if observer is not None:
            observer.before_routing(self.layer, x)
        weights = self._fused_weights(x) if x.shape[0] == 1 or as_steps else None
        if weights is not None and (x.shape[0] == 1 or self.store.all_resident):
            out, _ = self._fused_decode(x, weights)
        elif weights is not None:  # experts acquired token by token
            outs, routings = zip(*(self._fused_decode(row, weights) for row in x.split(1)))
            out, self.last_routing = torch.cat(outs), Routing.concat(routings)
        else:
            routing = self.route(x)
            self.last_routing = routing
            shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x, as_steps)
            out = self.store.run(self.layer, x, routing.ids, routing.weights) + shared
        if observer is not None:
            observer.routed(self.layer, self.last_routing.ids)
        return out.view(shape)

    def _fused_decode(self, x: torch.Tensor, kernel: "cpu_kernels.LayerKernel") -> tuple[torch.Tensor, Routing]:
        """Tokens (one, or up to MAX_ROWS when all experts are resident) through router, routed experts and
        shared expert in one CPU kernel call (bf16 experts, or quantized blobs); with experts not
        all resident, one token through the same kernel's two halves around acquiring the chosen experts (same
        bits). Sets and returns the routing."""
        weights = kernel.struct
        if self.store.all_resident:
            out, ids, routing, logits = cpu_kernels.moe_block(x, weights)
        else:
            ids, routing, logits, gate_logit = cpu_kernels.moe_route(x, weights)
            self.store.acquire(self.layer, ids, x)
            try:
                out = cpu_kernels.moe_experts(x, weights, ids, routing, gate_logit)
            finally:
                self.store.release(self.layer, ids)
        self.last_routing = Routing(ids, routing, logits)
        return out, self.last_routing

    def _fused_weights(self, x: torch.Tensor) -> "cpu_kernels.LayerKernel | None":
        """The fused kernel's view of this block when it can run x one kernel call per token: bf16 CPU
        activations, a store with an expert address table (bf16) or blob table (quantized), a bf16 router and a
        shared expert the kernels read. Built once per store (building costs ~10 µs, a noticeable part of a
        small model's step), rebuilt when a weight moved."""
        if not cpu_kernels.usable(x):
            return None
        built = self._fused
        if built is None or built[0] is not self.store or (built[1] and not built[1].valid()):
            built = self._fused = (self.store, self._build_fused())
        return built[1] or None

    def _apply(self, fn, *args, **kwargs):
        self._fused = None  # it points into the tensors this replaces
        return super()._apply(fn, *args, **kwargs)

    def _build_fused(self) -> "cpu_kernels.LayerKernel | None":
        table = self.store.address_table(self.layer)
        shared = self.shared_expert
        linears = (self.gate, self.shared_expert_gate, shared.gate_proj, shared.up_proj, shared.down_proj)
        if table is not None and all(isinstance(m, Linear) and m.weight.dtype == torch.bfloat16 for m in linears):
            return cpu_kernels.LayerKernel(self.kernel_weights(table), [table] + [m.weight for m in linears])
        quantized = self.store.quantized_table(self.layer)
        matrices = [kernel_matrix(m) for m in linears]
        if quantized is None or None in matrices:
            return None  # router or shared expert in a format the kernels do not read (fp32, another device)
        blobs, layout = quantized
        router, gate, *expert = (m for m, _ in matrices)
        struct = cpu_kernels.MoeQuant(router, self.gate.out_features, self.top_k, int(self.norm_topk_prob),
                                      blobs.data_ptr(), ctypes.pointer(layout), *expert, gate)
        return cpu_kernels.LayerKernel(struct, [blobs] + [a for _, arrays in matrices for a in arrays])

    def kernel_weights(self, table: torch.Tensor) -> "cpu_kernels.MoeWeights":
        shared = self.shared_expert
        return cpu_kernels.MoeWeights(
            self.gate.weight.data_ptr(), self.gate.out_features, self.top_k, int(self.norm_topk_prob),
            table.data_ptr(), self.intermediate_size, shared.gate_proj.weight.data_ptr(),
            shared.up_proj.weight.data_ptr(), shared.down_proj.weight.data_ptr(), shared.gate_proj.out_features,
            self.shared_expert_gate.weight.data_ptr(),
        )

