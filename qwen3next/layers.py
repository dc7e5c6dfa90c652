"""Small building blocks shared by the attention, DeltaNet and MoE layers.

Qwen3-Next has two RMSNorm flavours and mixing them up is the classic bug: most norms store
w near 0 and scale by (1 + w) ("zero-centered", for training stability); the gated norm inside
Gated DeltaNet stores w near 1 and scales by w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels


def rms_normalize(x: torch.Tensor, eps: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, times an fp32 scale, in fp32 (callers cast back)."""
    return F.rms_norm(x.float(), x.shape[-1:], scale, eps)


KERNEL_NORM_ELEMENTS = 1 << 16  # decode-sized inputs: the single-threaded C norm beats torch's op overhead


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose effective scale is (1 + weight), applied in fp32 before casting back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= KERNEL_NORM_ELEMENTS and self.weight.dtype == torch.bfloat16 and cpu_kernels.usable(x):
            return cpu_kernels.rms_norm_bf16(x, self.weight, self.eps, offset=1.0)
        return rms_normalize(x, self.eps, 1.0 + self.weight.float()).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm scaled by weight (not 1 + weight), then gated by silu(z).

    The order of casts follows the reference: normalise in fp32, cast, scale by the weight in
    the activation dtype, multiply by silu(z) in fp32, cast.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        normed = self.weight * rms_normalize(x, self.eps).to(x.dtype)
        return (normed * F.silu(z.float())).to(x.dtype)


_WIDEN_BYTES = 16 << 20  # bytes of fp32 weight rows `_fp32_matmul` widens at a time on the CPU


def linear(x: torch.Tensor, weight: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:
    """x @ weight.T; fp32_out keeps a bf16/fp16 product's fp32 sums unrounded (logits: bf16's step at
    8-16 is 0.0625, enough to tie close candidates). Decode-sized bf16 calls on the CPU use the
    bandwidth-bound kernel."""
    widen = fp32_out and x.dtype != torch.float32
    if weight.dtype == torch.bfloat16 and cpu_kernels.usable(x) \
            and x.numel() <= cpu_kernels.MAX_ROWS * weight.shape[1] and weight.is_contiguous():
        return cpu_kernels.linear_bf16(x, weight, fp32_out=widen)
    if not widen:
        if SLOW_CPU_BF16_GEMM and x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" \
                and x.numel() > cpu_kernels.MAX_ROWS * weight.shape[1]:
            return _fp32_matmul(x, weight).to(torch.bfloat16)
        return F.linear(x, weight)
    return _fp32_matmul(x, weight)


def _cpu_bf16_gemm_is_slow() -> bool:
    """True on CPUs where oneDNN has no bf16 path (no AVX-512): there torch's bf16 GEMM ran 3.5-4x slower
    than an fp32 GEMM on copies widened a block of rows at a time (docs/kernels.md), so a prefill
    chunk's bf16 matmuls take the latter; the sums are fp32 either way, rounded to bf16 once."""
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch without the query: keep its own GEMM
        return False


SLOW_CPU_BF16_GEMM = _cpu_bf16_gemm_is_slow()


def _fp32_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T in fp32 for bf16/fp16 operands, without an fp32 copy of a large weight."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return F.linear(x.float(), weight.float())  # differentiable (training); the paths below are not
    flat = x.reshape(-1, x.shape[-1])
    if x.device.type == "cuda":  # cuBLAS sums into fp32 outputs directly
        out = torch.mm(flat, weight.T, out_dtype=torch.float32)
    else:  # torch has no such CPU kernel: widen the weight a block of rows at a time
        out = torch.empty(flat.shape[0], weight.shape[0], device=x.device)
        wide_x, step = flat.float(), max(1, _WIDEN_BYTES // (4 * weight.shape[1]))
        for first in range(0, weight.shape[0], step):
            torch.mm(wide_x, weight[first : first + step].float().T, out=out[:, first : first + step])
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """A bias-free nn.Linear (checkpoint-compatible) that computes through `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:
        return linear(x, self.weight, fp32_out)


def kernel_matrix(module: nn.Module) -> tuple[cpu_kernels.Matrix, list[torch.Tensor]] | None:
    """A linear layer's weights as the layer kernels (csrc/layer_kernels.c) read them, with the tensors they
    live in: a bf16 `Linear` or an 8/4-bit quantized one (quant/modules.py: `bits` and `arrays`), contiguous on
    the CPU. None for anything else (fp32, another device), which then runs through the modules."""
    if isinstance(module, Linear):
        arrays, bits, group = [module.weight], 16, 0
        if module.weight.dtype != torch.bfloat16:
            return None
    elif getattr(module, "bits", None) in (4, 8):
        arrays, bits = module.arrays, module.bits
        group = module.in_features // arrays[1].shape[1] if bits == 4 else 0
    else:
        return None
    if any(a.device.type != "cpu" or not a.is_contiguous() for a in arrays):
        return None
    pointers = [a.data_ptr() for a in arrays] + [None] * (3 - len(arrays))
    return cpu_kernels.Matrix(bits, *pointers, module.out_features, module.in_features, group), arrays


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the shared expert (and dense MLP layers, if a config has any)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor, as_steps: bool = False) -> torch.Tensor:
        """as_steps: each row of x gets the bits a one-token call gives it (the fused kernel row by row)."""
        if (x.numel() == x.shape[-1] or as_steps) and self._all_bf16_linear() and cpu_kernels.usable(x):
            if x.numel() == x.shape[-1]:
                return self._fused_decode(x)
            return torch.cat([self._fused_decode(row) for row in x.reshape(-1, x.shape[-1]).split(1)]).view(x.shape)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def _all_bf16_linear(self) -> bool:
        """The fused kernel reads bf16 weights; a quantized checkpoint swaps in other modules."""
        return all(isinstance(p, Linear) and p.weight.dtype == torch.bfloat16
                   for p in (self.gate_proj, self.up_proj, self.down_proj))

    def _fused_decode(self, x: torch.Tensor) -> torch.Tensor:
        """One token through all three projections in one kernel call (as a single expert of weight 1)."""
        addresses = tuple(p.weight.data_ptr() for p in (self.gate_proj, self.up_proj, self.down_proj))
        if getattr(self, "_kernel_args", (None,))[0] != addresses:  # weights are assigned after construction
            self._kernel_args = (addresses, torch.tensor([addresses]), torch.zeros(1, dtype=torch.int64), torch.ones(1))
        _, table, ids, weights = self._kernel_args
        out = cpu_kernels.swiglu_experts_bf16(x.reshape(-1), table, ids, weights, self.gate_proj.out_features)
        return out.view(x.shape)


class PartialRotary:
    """Cos/sin tables for RoPE on the first `rotary_dim` dims of each head; the rest pass through.

    `cos_sin` computes them for any positions on their device, so the model can be built on the
    meta device without buffers to repair. `cos_sin_range`, for the consecutive positions of a
    forward, slices a table of the first positions kept per device and dtype (grown by doubling):
    computing even one position's table is a handful of tiny ops, a noticeable part of a small
    model's decode step. Every element is computed alone, so a slice holds the same bits.
    """

    def __init__(self, rotary_dim: int, theta: float):
        self.rotary_dim = rotary_dim
        self.theta = theta
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin_range(self, start: int, count: int, device: torch.device, dtype: torch.dtype):
        """cos_sin for positions start .. start + count - 1."""
        table = self._tables.get((device, dtype))
        if table is None or table[0].shape[0] < start + count:
            size = max(256, start + count, 0 if table is None else 2 * table[0].shape[0])
            table = self._tables[(device, dtype)] = self.cos_sin(torch.arange(size, device=device), dtype)
        return table[0][start : start + count], table[1][start : start + count]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [T, rotary_dim] for integer positions [T], in the activation dtype."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=positions.device) / self.rotary_dim
        inv_freq = 1.0 / self.theta**exponents
        freqs = positions.float()[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, heads, T, head_dim] (rotate-half pairing)."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated_half * sin, rest), dim=-1)
