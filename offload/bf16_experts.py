"""How unquantized routed experts compute from their slots (the compute piece of offload/cached_experts.py).

A slot holds one expert's gate, up and down matrices end to end, as stored (three reads), so gate|up
is one [2I, H] matrix exactly as moe.StackedExperts stacks it. bf16 rows on the CPU run the resident
store's kernels on the slots' addresses (the [experts, 3] table): up to MAX_ROWS tokens one at a time
through the fused expert kernel, more (on CPUs whose bf16 GEMM is slow) through the experts kernel,
whole or expert by expert, with the same bits; everything else runs each expert as StackedExperts
runs one. So results match the fully resident store bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen3next import cpu_kernels, layers

from .cached_experts import RowsKernel, combine_pairs


def token_by_token(x: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   inter: int) -> torch.Tensor:
    """Rows x [N, hidden] each through the fused one-token expert kernel: a decode step's bits, row by row."""
    return torch.stack([cpu_kernels.swiglu_experts_bf16(x[n], table, ids[n], weights[n], inter)
                        for n in range(x.shape[0])])


def bf16_rows_kernel(inter: int, hidden: int) -> RowsKernel | None:
    """Many bf16 rows through the experts of an [experts, 3] table in one call, on CPUs whose bf16 GEMM is slow
    (layers.SLOW_CPU_BF16_GEMM: there torch's grouped bf16 matmul ran a prefill chunk's experts at a third of the
    experts kernel's speed, docs/kernels.md); None elsewhere. Up to MAX_ROWS rows take the fused one-token
    kernel per row, as decode does, so each of them has a decode step's bits."""
    if not layers.SLOW_CPU_BF16_GEMM or cpu_kernels.library() is None:
        return None
    layout = cpu_kernels.bf16_layout(inter, hidden)

    def run(x: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= cpu_kernels.MAX_ROWS:
            return token_by_token(x, table, ids, weights, inter)
        return cpu_kernels.experts_quant(x, table, layout, ids, weights)

    return run


class Bf16Compute:
    """ExpertCompute for experts stored as plain matrices (`stored` dtype) computed in `dtype`;
    `shapes` per store layer: (intermediate, hidden)."""

    def __init__(self, shapes: dict[int, tuple[int, int]], stored: torch.dtype, dtype: torch.dtype):
        self.shapes, self.stored, self.dtype = shapes, stored, dtype
        self._many_rows = {layer: bf16_rows_kernel(*shape) if dtype == torch.bfloat16 else None
                           for layer, shape in shapes.items()}

    def fused_table(self, layer: int) -> bool:
        return self.stored == self.dtype == torch.bfloat16

    def blob_layout(self, layer: int) -> None:
        return None  # bf16 experts take the bf16 fused kernel (fused_table)

    def token_kernel(self, layer: int):
        if not self.fused_table(layer):
            return None
        inter = self.shapes[layer][0]
        return lambda x, table, ids, weights: cpu_kernels.swiglu_experts_bf16(x, table, ids, weights, inter)

    def rows_kernel(self, layer: int):
        return self._many_rows[layer] if self.fused_table(layer) else None  # None: expert by expert (run_expert)

    def run_expert(self, layer: int, expert: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rows x through one expert's slot: fp32 sums from the experts kernel where rows_kernel runs many rows
        (what it adds up), else bf16 as StackedExperts computes."""
        inter, hidden = self.shapes[layer]
        matrices = expert.view(self.stored)
        if self._many_rows[layer] is not None and expert.device.type == "cpu" and cpu_kernels.usable(x):
            matrices = matrices.to(torch.bfloat16)  # a copy for slots of another dtype, kept for the call
            matrix_bytes = inter * hidden * matrices.element_size()
            table = matrices.data_ptr() + torch.tensor([[0, matrix_bytes, 2 * matrix_bytes]], dtype=torch.int64)
            rows = torch.arange(x.shape[0])
            layout = cpu_kernels.bf16_layout(inter, hidden)
            return cpu_kernels.experts_pairs(x, table, layout, torch.zeros_like(rows), rows)
        gate_up = matrices[: 2 * inter * hidden].view(2 * inter, hidden).to(x.dtype)
        down = matrices[2 * inter * hidden :].view(hidden, inter).to(x.dtype)
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, down)

    def combine(self, pairs: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
        return combine_pairs(pairs, order, weights, x)
