"""The two forms of the gated delta rule agree, with and without a carried-in state."""

from __future__ import annotations

import pytest
import torch

from qwen3next.gated_delta import chunked, l2_normalize, recurrent


def inputs(T: int, seed: int = 0, B: int = 2, H: int = 3, dk: int = 8, dv: int = 6):
    gen = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(B, H, T, dk, generator=gen)) * dk**-0.5
    k = l2_normalize(torch.randn(B, H, T, dk, generator=gen))
    v = torch.randn(B, H, T, dv, generator=gen)
    g = -torch.rand(B, H, T, generator=gen) * 2  # log decays in (-2, 0]
    beta = torch.rand(B, H, T, generator=gen)
    state = torch.randn(B, H, dk, dv, generator=gen)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("T", [1, 5, 16, 37, 64])
def test_chunked_equals_recurrent(T):
    q, k, v, g, beta, state = inputs(T)
    out_r, state_r = recurrent(q, k, v, g, beta, state)
    out_c, state_c = chunked(q, k, v, g, beta, state, chunk=16)
    torch.testing.assert_close(out_c, out_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state_c, state_r, rtol=1e-4, atol=1e-5)


def test_state_carries_across_calls():
    q, k, v, g, beta, state = inputs(40, seed=1)
    whole, final = chunked(q, k, v, g, beta, state, chunk=16)
    first, mid = chunked(q[:, :, :25], k[:, :, :25], v[:, :, :25], g[:, :, :25], beta[:, :, :25], state, chunk=16)
    second, end = recurrent(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:], g[:, :, 25:], beta[:, :, 25:], mid)
    torch.testing.assert_close(torch.cat((first, second), dim=2), whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(end, final, rtol=1e-4, atol=1e-5)


def test_decay_forgets_and_beta_zero_writes_nothing():
    q, k, v, g, beta, state = inputs(3, seed=2)
    _, kept = recurrent(q, k, v, torch.zeros_like(g), torch.zeros_like(beta), state)
    torch.testing.assert_close(kept, state)  # g = 0, beta = 0: the state passes through untouched
    _, forgotten = recurrent(q, k, v, torch.full_like(g, -80.0), torch.zeros_like(beta), state)
    assert forgotten.abs().max() < 1e-30
