"""Routed experts computed from an expert cache: the ExpertStore for every folder run under a budget.

Placement is the cache's (offload/expert_cache.py); the arithmetic is a per-format compute piece
(offload/quantized_experts.py for quantized blobs, offload/bf16_experts.py for bf16 matrices). This
module only sequences the two, the same way whatever the placement, so a budget changes speed and
never a bit of the output:
  one token (CPU kernels)   the chosen experts acquired, then the format's one-token kernel over the
                            layer's address table, summing in the router's order
  bf16 one-token steps      SparseMoE routes and computes in two kernel calls around acquire() and
                            release() (moe.SparseMoE._fused_decode): the fused kernel's bits
  a prefill chunk           all experts resident (CPU kernels): one call for all rows, each expert once
                            on its rows, summing in the router's order (the one-token kernel's bits);
                            otherwise reads for every chosen expert start first, then each expert runs
                            once on all its tokens in ascending expert order, summed by the format
                            (quantized on the CPU: the kernel's sum, so the same bits again)
The prefetcher (offload/prefetch.py) is not called from here: it is a routing observer, and the engine
installs it (`prefetcher`) beside the router statistics, so it sees each layer before it routes.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from qwen3next import cpu_kernels

from .expert_cache import ExpertCache
from .prefetch import LookaheadPrefetcher

TokenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RowsKernel = TokenKernel


class ExpertCompute(Protocol):
    """How one format's experts run from the bytes a cache slot holds."""

    def token_kernel(self, layer: int) -> TokenKernel | None:
        """(x [hidden], table, ids [k] int64, weights [k] fp32) -> [hidden] on the CPU, or None."""
        ...

    def rows_kernel(self, layer: int) -> RowsKernel | None:
        """(x [N, hidden], table, ids [N, k] int64, weights [N, k] fp32) -> [N, hidden] on the CPU for any N, with
        every expert in the table, each of up to MAX_ROWS rows with the token kernel's bits and more rows with
        run_expert's then combine's; or None (many rows run per expert)."""
        ...

    def run_expert(self, layer: int, expert: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate x) * up x) for rows x, from one expert's slot bytes (on x's device)."""
        ...

    def fused_table(self, layer: int) -> bool:
        """Whether the layer's address table is the bf16 [experts, 3] table the fused MoE kernel reads."""
        ...

    def blob_layout(self, layer: int) -> cpu_kernels.ExpertLayout | None:
        """The C layout of the layer's quantized blobs, for the fused quantized MoE kernel; None for bf16."""
        ...

    def combine(self, pairs: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
        """[N, hidden]: run_expert's results pairs [N * k, hidden] (row n * k + i: token n's i-th choice),
        weighted by weights [N, k] and summed per token; order groups the pairs by expert (ascending)."""
        ...


def weighted_sum(pairs: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ExpertCompute.combine as moe.StackedExperts sums: one index_add_ in the same (expert, token) order."""
    weighted = pairs[order] * weights.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, order // weights.shape[-1], weighted.to(x.dtype))


def combine_pairs(pairs: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ExpertCompute.combine for pairs from either path of a compute piece: the experts kernel's fp32 sums are
    added as its one-call form adds them (cpu_kernels.experts_combine, the router's order), anything else as
    StackedExperts adds its results (weighted_sum)."""
    if pairs.dtype != torch.float32 or x.dtype != torch.bfloat16:
        return weighted_sum(pairs, order, weights, x)
    return cpu_kernels.experts_combine(pairs, weights.float())


class CachedExperts:
    def __init__(self, cache: ExpertCache, compute: ExpertCompute, device: torch.device,
                 prefetcher: LookaheadPrefetcher | None = None):
        self.cache, self.compute, self.device, self.prefetcher = cache, compute, device, prefetcher
        self._kernels = {layer: compute.token_kernel(layer) for layer in cache.layers}
        self._rows_kernels = {layer: compute.rows_kernel(layer) for layer in cache.layers}
        self.device_arena = None
        if cache.complete and device.type != "cpu":
            self.device_arena = cache.arena.to(device)  # everything resident: one copy on the device

    @property
    def all_resident(self) -> bool:
        return self.cache.complete

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        kernel, rows_kernel = self._kernels[layer], self._rows_kernels[layer]
        if self.device.type == "cpu" and cpu_kernels.usable(x):
            ids, weights = ids.to(torch.int64).contiguous(), weights.float().contiguous()  # C reads raw memory
            if rows_kernel is not None and self.cache.complete:  # all rows in one call, each expert once on its rows
                return rows_kernel(x, self.cache.tables[layer], ids, weights)
            if kernel is not None and x.shape[0] <= cpu_kernels.MAX_ROWS:
                return torch.stack([self._token(layer, x[n : n + 1], ids[n : n + 1], weights[n], kernel)
                                    for n in range(x.shape[0])])
        return self._per_expert(layer, x, ids, weights)

    def acquire(self, layer: int, ids: torch.Tensor, x: torch.Tensor) -> None:
        """Make the experts one token chose (ids [1, k]) resident and pinned."""
        if not self.cache.complete:
            self.cache.acquire(layer, ids.flatten().tolist())

    def release(self, layer: int, ids: torch.Tensor) -> None:
        self.cache.release(layer, ids.flatten().tolist())

    def address_table(self, layer: int) -> torch.Tensor | None:
        """The bf16 [experts, 3] table (valid for acquired experts) for the fused kernel, else None."""
        return self.cache.tables[layer] if self.compute.fused_table(layer) else None

    def quantized_table(self, layer: int) -> tuple[torch.Tensor, cpu_kernels.ExpertLayout] | None:
        """The [experts, 1] blob addresses (valid for acquired experts) and their C layout, on the CPU."""
        layout = self.compute.blob_layout(layer) if self.device.type == "cpu" else None
        return None if layout is None else (self.cache.tables[layer], layout)

    def close(self) -> None:
        self.cache.close()

    def _token(self, layer, x, ids, weights, kernel) -> torch.Tensor:
        self.acquire(layer, ids, x)
        try:
            return kernel(x[0], self.cache.tables[layer], ids[0], weights)
        finally:
            self.release(layer, ids)

    def _per_expert(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each chosen expert once on all the tokens that chose it, in ascending expert order; the results
        summed by the format's compute piece (ExpertCompute.combine)."""
        top_k = ids.shape[-1]
        order = torch.argsort(ids.flatten(), stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(ids.flatten(), minlength=self.cache.experts).tolist()
        chosen = [e for e, n in enumerate(counts) if n]
        self.cache.prefetch(layer, chosen)
        pairs = None  # [N * k, hidden]: each expert's results written where its (token, slot) pairs sit
        start = 0
        for expert in chosen:
            rows = order[start : start + counts[expert]]
            start += counts[expert]
            self.cache.acquire(layer, [expert])
            try:
                result = self.compute.run_expert(layer, self._slot_bytes(layer, expert), x[rows // top_k])
            finally:
                self.cache.release(layer, [expert])
            if pairs is None:
                pairs = result.new_empty(ids.numel(), result.shape[-1])
            pairs[rows] = result
        return self.compute.combine(pairs, order, weights, x)

    def _slot_bytes(self, layer: int, expert: int) -> torch.Tensor:
        if self.device_arena is not None:
            slot = self.cache.slot_of[layer][expert]
            return self.device_arena[slot, : self.cache.sources[layer].nbytes]
        view = self.cache.view(layer, expert)
        return view if self.device.type == "cpu" else view.to(self.device)
