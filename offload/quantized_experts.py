"""How quantized routed experts compute from their blobs (the compute piece of offload/cached_experts.py).

bf16 rows on the CPU run the C kernels, whose every row has the same bits however the rows are split:
a token or a whole prefill chunk in one call over the layer's blob address table when the experts are
there (cpu_kernels.experts_quant: each expert once on its rows, summed in the router's order), or expert
by expert as an expert cache hands them out (experts_pairs per expert, then experts_combine). Elsewhere
(other devices, no C compiler) each expert runs on its rows through quant/modules.quantized_matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen3next import cpu_kernels
from qwen3next.checkpoint_names import PROJECTIONS
from qwen3next.quant.layout import ExpertLayout, ProjectionLayout, array_specs
from qwen3next.quant.modules import quantized_matmul
from qwen3next.weights import SAFETENSORS_DTYPES

from .cached_experts import combine_pairs


class QuantizedCompute:
    """ExpertCompute for blobs in the quantized format; `layouts` per store layer."""

    def __init__(self, layouts: dict[int, ExpertLayout]):
        self.layouts = layouts
        self.kernel_layouts = {layer: kernel_layout(layout) for layer, layout in layouts.items()}

    def token_kernel(self, layer: int):
        layout = self.kernel_layouts[layer]
        if layout is None:
            return None
        return lambda x, table, ids, weights: cpu_kernels.experts_quant(x, table, layout, ids, weights)

    rows_kernel = token_kernel  # the same call takes any number of rows

    def run_expert(self, layer: int, expert: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rows x through one expert: fp32 sums from the CPU kernel (what experts_quant adds up), else bf16."""
        layout = self.kernel_layouts[layer]
        if layout is None or expert.device.type != "cpu" or not cpu_kernels.usable(x):
            return run_expert(expert, self.layouts[layer], x)
        rows = torch.arange(x.shape[0])
        return cpu_kernels.experts_pairs(x, torch.tensor([expert.data_ptr()]), layout, torch.zeros_like(rows), rows)

    def combine(self, pairs: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
        return combine_pairs(pairs, order, weights, x)

    def fused_table(self, layer: int) -> bool:
        return False  # the bf16 fused MoE kernel reads bf16 matrices; blob_layout serves the quantized one

    def blob_layout(self, layer: int) -> cpu_kernels.ExpertLayout | None:
        return self.kernel_layouts[layer]


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
        return cpu_kernels.Projection(q.bits, q.rows, q.cols, q.group, q.offsets[0], q.offsets[1], minimum, 0)

    return cpu_kernels.ExpertLayout(*(projection(p[name]) for name in PROJECTIONS), 1)  # one blob per expert
