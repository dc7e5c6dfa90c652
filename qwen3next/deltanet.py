"""Gated DeltaNet: the linear-attention layer of three out of four Qwen3-Next layers.

Around the recurrence (gated_delta.py) it does: one fused projection whose output is grouped
by key head, a causal depthwise conv over q, k and v with a rolling state, l2-normalised q and
k, per-head decay g = -exp(A_log) * softplus(a + dt_bias) and write strength beta = sigmoid(b),
then a gated RMSNorm with z and out_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .cache import DeltaNetState
from .config import Qwen3NextConfig
from .gated_delta import gated_delta_rule, l2_normalize
from .layers import GatedRMSNorm, Linear, kernel_matrix


class GatedDeltaNet(nn.Module):
    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.k_heads = config.linear_num_key_heads
        self.v_heads = config.linear_num_value_heads
        self.k_dim = config.linear_key_head_dim
        self.v_dim = config.linear_value_head_dim
        self.v_per_k = self.v_heads // self.k_heads
        self.kernel = config.linear_conv_kernel_dim
        hidden = config.hidden_size
        key_total, value_total = self.k_heads * self.k_dim, self.v_heads * self.v_dim
        self.conv_channels = 2 * key_total + value_total

        self.in_proj_qkvz = Linear(hidden, 2 * key_total + 2 * value_total)
        self.in_proj_ba = Linear(hidden, 2 * self.v_heads)
        self.conv1d = nn.Conv1d(
            self.conv_channels, self.conv_channels, self.kernel, groups=self.conv_channels, bias=False
        )
        self.A_log = nn.Parameter(torch.zeros(self.v_heads))
        self.dt_bias = nn.Parameter(torch.ones(self.v_heads))
        self.norm = GatedRMSNorm(self.v_dim, config.rms_norm_eps)
        self.out_proj = Linear(value_total, hidden)

    def _fused_cpu(self, x: torch.Tensor, state: DeltaNetState, keep: bool) -> torch.Tensor:
        """bf16 on the CPU: conv, delta rule (sequential form) and gated norm in one kernel call; each token's
        output is the bits of a one-token call. keep: the kernel also writes the states after every token but
        the last into `state.kept` (a speculative verify pass rolls back to them)."""
        kept = self._kernel_states(x, state, keep)
        out = x.new_empty(1, x.shape[1], self.v_heads * self.v_dim)
        cpu_kernels.gated_delta_bf16(
            self.in_proj_qkvz(x), self.in_proj_ba(x), self.conv1d.weight, state.conv, self.A_log, self.dt_bias,
            self.norm.weight, state.recurrent, out, self.k_heads, self.v_heads, self.k_dim, self.v_dim, self.norm.eps,
            kept,
        )
        self._keep(state, kept, keep)
        return self.out_proj(out)

    def _kernel_states(self, x: torch.Tensor, state: DeltaNetState, keep: bool):
        """Make `state` ready for a kernel that updates it in place (zero history when a sequence starts); with
        keep, return the buffers the kernel writes the states after each of x's tokens but the last into."""
        if state.conv is None:
            state.conv = x.new_zeros(1, self.conv_channels, self.kernel - 1)
            state.recurrent = x.new_zeros(1, self.v_heads, self.k_dim, self.v_dim, dtype=torch.float32)
        T = x.shape[1]
        if not keep or T == 1:
            return None
        return (state.recurrent.new_empty(T - 1, *state.recurrent.shape[1:]),
                state.conv.new_empty(T - 1, *state.conv.shape[1:]))

    @staticmethod
    def _keep(state: DeltaNetState, kept, keep: bool) -> None:
        if keep:
            state.kept = [] if kept is None else [DeltaNetState(conv, recurrent) for recurrent, conv
                                                  in zip(kept[0].split(1), kept[1].split(1))]

    def layer_kernel(self, norms: cpu_kernels.LayerNorms, norm_tensors: list[torch.Tensor]):
        """The decoder layer's norm, this mixer and the residual as one kernel call (csrc/layer_kernels.c):
        returns step(x, cos_sin, state, keep) -> (residual stream, its post-attention norm) and the
        cpu_kernels.LayerKernel it calls, or None where a weight is in a format the kernel does not read."""
        matrices = [kernel_matrix(m) for m in (self.in_proj_qkvz, self.in_proj_ba, self.out_proj)]
        vectors = [self.conv1d.weight, self.A_log, self.dt_bias, self.norm.weight]
        if None in matrices or self.kernel > cpu_kernels.MAX_CONV_KERNEL or any(
                v.dtype != torch.bfloat16 or v.device.type != "cpu" or not v.is_contiguous() for v in vectors):
            return None
        struct = cpu_kernels.DeltaNetLayer(norms, *(m for m, _ in matrices), *(v.data_ptr() for v in vectors),
                                           self.k_heads, self.v_heads, self.k_dim, self.v_dim, self.kernel)
        kernel = cpu_kernels.LayerKernel(struct, norm_tensors + vectors + [a for _, arrays in matrices for a in arrays])

        def step(x: torch.Tensor, cos_sin, state: DeltaNetState, keep: bool):
            kept = self._kernel_states(x, state, keep)
            out = cpu_kernels.deltanet_layer_bf16(kernel, x, state.conv, state.recurrent, kept)
            self._keep(state, kept, keep)
            return out
        return step, kernel

    def _project(self, x: torch.Tensor):
        """Split the fused projections, which the checkpoint groups by key head.

        in_proj_qkvz rows per key head g: [q_g | k_g | v of its value heads | z of its value heads];
        in_proj_ba rows per key head g: [b of its value heads | a of its value heads].
        Returns the conv input [B, T, q_all | k_all | v_all], z [B, T, v_heads, v_dim], b, a [B, T, v_heads].
        """
        B, T, _ = x.shape
        grouped = self.in_proj_qkvz(x).view(B, T, self.k_heads, -1)
        vz = self.v_per_k * self.v_dim
        q, k, v, z = grouped.split((self.k_dim, self.k_dim, vz, vz), dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, self.k_heads, 2 * self.v_per_k).split(self.v_per_k, dim=-1)
        conv_input = torch.cat((q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)), dim=-1)
        return conv_input, z.reshape(B, T, self.v_heads, self.v_dim), b.reshape(B, T, -1), a.reshape(B, T, -1)

    def _conv(self, x: torch.Tensor, state: DeltaNetState | None) -> torch.Tensor:
        """Causal depthwise conv + SiLU over [B, T, C]; keeps the last kernel-1 inputs in `state`."""
        B, T, C = x.shape
        x = x.transpose(1, 2)  # [B, C, T]
        previous = None if state is None else state.conv
        if previous is None:
            previous = x.new_zeros(B, C, self.kernel - 1)
        window = torch.cat((previous.to(x.dtype), x), dim=-1)  # [B, C, T + kernel - 1]
        if state is not None:
            state.conv = window[:, :, -(self.kernel - 1) :].contiguous()  # the decode kernel updates it in place
        if T == 1:  # one output: a dot product per channel (in fp32, as the conv accumulates) beats the conv call
            out = (window.float() * self.conv1d.weight[:, 0].float()).sum(-1, keepdim=True).to(x.dtype)
        else:
            out = F.conv1d(window, self.conv1d.weight, groups=C)
        return F.silu(out).transpose(1, 2)

    def fused_kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether x runs through the one-call CPU kernel (bf16, one sequence, a conv the kernel takes)."""
        return x.shape[0] == 1 and self.conv1d.weight.dtype == torch.bfloat16 and cpu_kernels.usable(x) \
            and self.kernel <= cpu_kernels.MAX_CONV_KERNEL  # usable() first: only CPU inputs touch the library

    def forward(self, x: torch.Tensor, state: DeltaNetState | None, as_steps: bool = False) -> torch.Tensor:
        """as_steps (the fused kernel only, which computes tokens in order anyway): also keep the state after
        each token in `state.kept`."""
        B, T, _ = x.shape
        if self.fused_kernel_applies(x):
            return self._fused_cpu(x, DeltaNetState() if state is None else state, as_steps)
        conv_input, z, b, a = self._project(x)
        mixed = self._conv(conv_input, state)
        key_total = self.k_heads * self.k_dim
        q, k, v = mixed.split((key_total, key_total, self.v_heads * self.v_dim), dim=-1)

        # [B, T, heads, dim] -> [B, v_heads, T, dim] in fp32; key head g serves value heads g*r .. g*r+r-1
        q = l2_normalize(q.view(B, T, self.k_heads, self.k_dim).float()) * self.k_dim**-0.5
        k = l2_normalize(k.view(B, T, self.k_heads, self.k_dim).float())
        q, k = (t.repeat_interleave(self.v_per_k, dim=2).transpose(1, 2) for t in (q, k))
        v = v.reshape(B, T, self.v_heads, self.v_dim).transpose(1, 2).float()
        beta = torch.sigmoid(b).float().transpose(1, 2)  # sigmoid in the activation dtype, as the reference
        g = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())).transpose(1, 2)

        recurrent = None if state is None else state.recurrent
        if recurrent is None:
            recurrent = q.new_zeros(B, self.v_heads, self.k_dim, self.v_dim)
        out, recurrent = gated_delta_rule(q, k, v, g, beta, recurrent)
        if state is not None:
            state.recurrent = recurrent.contiguous()

        out = out.transpose(1, 2).to(x.dtype)  # [B, T, v_heads, v_dim]
        return self.out_proj(self.norm(out, z).reshape(B, T, -1))
