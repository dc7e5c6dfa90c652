"""Quantized routed experts computed from an expert cache: the ExpertStore for quantized folders.

Placement is the cache's (offload/expert_cache.py); this module only computes, and computes the
same way whatever the placement, so a budget changes speed and never a bit of the output:
  one token (CPU kernels)   every chosen expert acquired, then one kernel call over the layer's
                            address table, summing in the router's order (cpu_kernels.experts_quant)
  a few tokens              the same kernel per token
  a prefill chunk           each chosen expert once on all its tokens, in ascending expert order
                            (reads for all of them start first, so computing overlaps reading)
  other devices, no kernels dequantized matmuls on the same blobs (quant/modules.quantized_matmul)
While a decode step's layer computes, the prefetcher's guesses for the next layer are being read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen3next import cpu_kernels
from qwen3next.checkpoint_names import PROJECTIONS
from qwen3next.quant.layout import ExpertLayout, ProjectionLayout, array_specs
from qwen3next.quant.modules import quantized_matmul
from qwen3next.weights import SAFETENSORS_DTYPES

from .expert_cache import ExpertCache
from .prefetch import Prefetcher


class CachedQuantizedExperts:
    def __init__(self, cache: ExpertCache, device: torch.device, prefetcher: Prefetcher | None = None):
        self.cache, self.device, self.prefetcher = cache, device, prefetcher
        self.layouts = {layer: source.layout for layer, source in cache.sources.items()}
        self._kernel_layouts = {layer: kernel_layout(layout) for layer, layout in self.layouts.items()}
        self.device_arena = None
        if cache.complete and device.type != "cpu":
            self.device_arena = cache.arena.to(device)  # everything resident: one copy on the device

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel_layouts[layer]
        if kernel is not None and self.device.type == "cpu" and cpu_kernels.usable(x) \
                and x.shape[0] <= cpu_kernels.MAX_ROWS:
            ids, weights = ids.to(torch.int64).contiguous(), weights.float().contiguous()  # C reads raw memory
            return torch.stack([self._token(layer, x, ids, weights, n, kernel) for n in range(x.shape[0])])
        return self._per_expert(layer, x, ids, weights)

    def _token(self, layer, x, ids, weights, n, kernel) -> torch.Tensor:
        if self.cache.complete:  # every expert resident: nothing to acquire, nothing to prefetch
            return cpu_kernels.experts_quant(x[n], self.cache.tables[layer], kernel, ids[n], weights[n])
        chosen = ids[n].tolist()
        self.cache.acquire(layer, chosen)
        try:
            self._prefetch_after(layer, x[n : n + 1], ids[n : n + 1])
            return cpu_kernels.experts_quant(x[n], self.cache.tables[layer], kernel, ids[n], weights[n])
        finally:
            self.cache.release(layer, chosen)

    def _per_expert(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each chosen expert once on all the tokens that chose it, in ascending expert order."""
        out = torch.zeros_like(x)
        experts = torch.unique(ids).tolist()
        self.cache.prefetch(layer, experts)
        layout = self.layouts[layer]
        for expert in experts:
            tokens, slots = torch.nonzero(ids == expert, as_tuple=True)
            self.cache.acquire(layer, [expert])
            try:
                y = run_expert(self._blob(layer, expert), layout, x[tokens])
            finally:
                self.cache.release(layer, [expert])
            out.index_add_(0, tokens, (y * weights[tokens, slots, None]).to(x.dtype))
        return out

    def _blob(self, layer: int, expert: int) -> torch.Tensor:
        if self.device_arena is not None:
            slot = self.cache.slot_of[layer][expert]
            return self.device_arena[slot, : self.layouts[layer].nbytes]
        blob = self.cache.view(layer, expert)
        return blob if self.device.type == "cpu" else blob.to(self.device)

    def _prefetch_after(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> None:
        if self.prefetcher is None or self.cache.complete:
            return
        guess = self.prefetcher.candidates(layer, x, ids)
        if guess is not None:
            self.cache.prefetch(*guess)

    def close(self) -> None:
        self.cache.close()

    def address_table(self, layer: int) -> None:
        return None  # the one-call bf16 MoE kernel does not read quantized blobs



def stored_arrays(blob: torch.Tensor, p: ProjectionLayout) -> list[torch.Tensor]:
    """Views of one projection's arrays (codes, scale[, minimum]) inside an expert blob."""
    return [blob[offset:offset + size].view(SAFETENSORS_DTYPES[dtype]).view(shape)
            for offset, (dtype, shape, size) in zip(p.offsets, array_specs(p.rows, p.cols, p.bits, p.group))]


def run_expert(blob: torch.Tensor, layout: ExpertLayout, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for rows x through one expert blob."""
    gate, up, down = ((p.bits, stored_arrays(blob, p)) for p in (layout.projections[name] for name in PROJECTIONS))
    return quantized_matmul(F.silu(quantized_matmul(x, *gate)) * quantized_matmul(x, *up), *down)


def kernel_layout(layout: ExpertLayout) -> cpu_kernels.ExpertLayout | None:
    """The C description of a layer's blobs, when the CPU kernel can run them."""
    p = layout.projections
    if p["gate_proj"].bits == p["up_proj"].bits == 4 and p["gate_proj"].group != p["up_proj"].group:
        return None

    def projection(q: ProjectionLayout) -> cpu_kernels.Projection:
        minimum = q.offsets[2] if q.bits == 4 else 0
        return cpu_kernels.Projection(q.bits, q.rows, q.cols, q.group, q.offsets[0], q.offsets[1], minimum)

    return cpu_kernels.ExpertLayout(*(projection(p[name]) for name in PROJECTIONS))
