"""A resident store of quantized routed experts: every expert blob of a layer (quant/layout.py) held in memory.

Each layer's blobs sit in one [experts, blob bytes] uint8 tensor, read from the shards with pread
(a memory map would count every page twice: page cache and process). One token on the CPU runs
all its chosen experts in one kernel call that reads the 4- or 8-bit codes directly
(cpu_kernels.experts_quant); larger batches run each chosen expert once on all the tokens that chose
it, through the matrix-vector kernels while an expert has few tokens (the usual case in a prefill
chunk: 64 tokens spread over hundreds of experts) and as dequantized matmuls otherwise, which is also
what other devices and machines without the kernels do.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from qwen3next import cpu_kernels
from qwen3next.checkpoint_names import PROJECTIONS
from qwen3next.quant.layout import ExpertLayout, ProjectionLayout, array_specs
from qwen3next.quant.modules import quantized_matmul
from qwen3next.weights import SAFETENSORS_DTYPES, pread_into

class QuantizedExpertStore:
    def __init__(self, blobs: dict[int, torch.Tensor], layouts: dict[int, ExpertLayout]):
        self.blobs, self.layouts = blobs, layouts
        self._kernel_args = {layer: _kernel_args(blobs[layer], layouts[layer]) for layer in blobs}

    @classmethod
    def from_files(cls, layers: dict[int, tuple[ExpertLayout, list[tuple[str, int, int]]]],
                   device: torch.device, progress: Callable[[int], None] = lambda n: None) -> "QuantizedExpertStore":
        """layers: layer id -> (layout, [(file, offset, length) of each expert's blob, in expert order])."""
        blobs, layouts = {}, {}
        for layer, (layout, ranges) in layers.items():
            stacked = torch.empty(len(ranges), layout.nbytes, dtype=torch.uint8)
            for expert, (path, offset, length) in enumerate(ranges):
                pread_into(path, offset, stacked[expert], what=f"expert {expert} of layer {layer}")
                progress(1)
            blobs[layer], layouts[layer] = stacked.to(device), layout
        return cls(blobs, layouts)

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        args = self._kernel_args[layer]
        if args is not None and x.shape[0] <= cpu_kernels.MAX_ROWS and cpu_kernels.usable(x):
            addresses, layout = args
            ids, weights = ids.to(torch.int64).contiguous(), weights.float().contiguous()
            return torch.stack([cpu_kernels.experts_quant(x[n], addresses, layout, ids[n], weights[n])
                                for n in range(x.shape[0])])
        return self._run_per_expert(layer, x, ids, weights)

    def _run_per_expert(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each chosen expert once, on all the tokens that chose it (quantized_matmul picks kernel or dequantize)."""
        out = torch.zeros_like(x)
        blobs, layout = self.blobs[layer], self.layouts[layer]
        for expert in torch.unique(ids).tolist():
            tokens, slots = torch.nonzero(ids == expert, as_tuple=True)
            gate, up, down = ((p.bits, stored_arrays(blobs[expert], p))
                              for p in (layout.projections[name] for name in PROJECTIONS))
            part = x[tokens]
            hidden = F.silu(quantized_matmul(part, *gate)) * quantized_matmul(part, *up)
            y = quantized_matmul(hidden, *down)
            out.index_add_(0, tokens, (y * weights[tokens, slots, None]).to(x.dtype))
        return out

    def address_table(self, layer: int) -> None:
        return None  # the one-call bf16 MoE kernel does not read quantized blobs

    def parameters(self) -> Iterable[torch.Tensor]:
        return iter(self.blobs.values())

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blobs.values())


def stored_arrays(blob: torch.Tensor, p: ProjectionLayout) -> list[torch.Tensor]:
    """Views of one projection's arrays (codes, scale[, minimum]) inside an expert blob."""
    return [blob[offset:offset + size].view(SAFETENSORS_DTYPES[dtype]).view(shape)
            for offset, (dtype, shape, size) in zip(p.offsets, array_specs(p.rows, p.cols, p.bits, p.group))]


def _kernel_args(blobs: torch.Tensor, layout: ExpertLayout) -> tuple[torch.Tensor, cpu_kernels.ExpertLayout] | None:
    """Blob addresses and the C layout, when the CPU kernel can run this layer."""
    p = layout.projections
    if blobs.device.type != "cpu" or (p["gate_proj"].bits == p["up_proj"].bits == 4
                                       and p["gate_proj"].group != p["up_proj"].group):
        return None
    addresses = blobs.data_ptr() + torch.arange(blobs.shape[0], dtype=torch.int64) * blobs.stride(0)

    def projection(q: ProjectionLayout) -> cpu_kernels.Projection:
        minimum = q.offsets[2] if q.bits == 4 else 0
        return cpu_kernels.Projection(q.bits, q.rows, q.cols, q.group, q.offsets[0], q.offsets[1], minimum)

    return addresses, cpu_kernels.ExpertLayout(*(projection(p[name]) for name in PROJECTIONS))
