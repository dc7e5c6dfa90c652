"""How unquantized routed experts compute from their slots (the compute piece of offload/cached_experts.py).

A slot holds one expert's gate, up and down matrices end to end, as stored (three reads), so gate|up
is one [2I, H] matrix exactly as moe.StackedExperts stacks it. One bf16 token on the CPU runs the
resident path's kernels on the slots' addresses (the [experts, 3] table); everything else runs each
expert as StackedExperts runs one, so results match the fully resident store bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen3next import cpu_kernels

from .cached_experts import weighted_sum


class Bf16Compute:
    """ExpertCompute for experts stored as plain matrices (`stored` dtype) computed in `dtype`;
    `shapes` per store layer: (intermediate, hidden)."""

    def __init__(self, shapes: dict[int, tuple[int, int]], stored: torch.dtype, dtype: torch.dtype):
        self.shapes, self.stored, self.dtype = shapes, stored, dtype

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
        return None  # many tokens run expert by expert (run_expert)

    def run_expert(self, layer: int, expert: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        inter, hidden = self.shapes[layer]
        matrices = expert.view(self.stored)
        gate_up = matrices[: 2 * inter * hidden].view(2 * inter, hidden).to(x.dtype)
        down = matrices[2 * inter * hidden :].view(hidden, inter).to(x.dtype)
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, down)

    def combine(self, pairs: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
        return weighted_sum(pairs, order, weights, x)
