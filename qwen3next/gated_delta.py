"""The gated delta rule: the recurrence at the heart of Gated DeltaNet, and nothing else.

Per value head, with a state S [dk, dv] (fp32) and per-token q, k [dk], v [dv], decay g <= 0
(log space) and write strength beta in (0, 1), in this order:

    S <- exp(g) * S;   delta = beta * (v - S^T k);   S <- S + k delta^T;   o = S^T q

`recurrent` runs it token by token (decode); `chunked` computes the same in blocks of C tokens
with a few matmuls per block (prefill). Inside a block, with cumulative decays G_t and the
block's starting state S0, the deltas solve a unit lower-triangular system
    L delta = beta v - (beta k e^G) S0,   L[t, j] = beta_t (k_t . k_j) e^(G_t - G_j)  for j < t
so delta = U - W S0 with U = L^-1 beta v and W = L^-1 beta k e^G; then
    o_t = e^(G_t) S0^T q_t + sum_{j <= t} e^(G_t - G_j) (q_t . k_j) delta_j
    S_C = e^(G_C) S0 + sum_j e^(G_C - G_j) k_j delta_j^T.
Both forms agree to rounding; tests hold them to each other.

Shapes: q, k [B, H, T, dk] and v [B, H, T, dv] with one head per value head (the caller repeats
key heads), g and beta [B, H, T], state [B, H, dk, dv]. All math in fp32.
"""

from __future__ import annotations

import torch

CHUNK = 32  # measured fastest on CPU for 32-128-wide heads (64 costs ~35% more per layer)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the eps placement matches the reference kernels)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def recurrent(q, k, v, g, beta, state):
    """Token-by-token form. Returns (outputs [B, H, T, dv], final state)."""
    outputs = []
    decays = g.exp()[..., None, None]  # [B, H, T, 1, 1]
    for t in range(q.shape[2]):
        state = state * decays[:, :, t]
        k_t = k[:, :, t : t + 1]  # [B, H, 1, dk]: row vectors make the products plain matmuls
        delta = beta[:, :, t, None, None] * (v[:, :, t : t + 1] - k_t @ state)  # [B, H, 1, dv]
        state = state + k_t.transpose(-1, -2) @ delta
        outputs.append(q[:, :, t : t + 1] @ state)
    return torch.cat(outputs, dim=2), state


def chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """Block-parallel form for prefill (see the module docstring for the algebra)."""
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    pad = (-T) % chunk
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)

    G = g.cumsum(-1)  # [B, H, n, C]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # decay[t, j] = e^(G_t - G_j) for j <= t, else 0 (masked before exp to avoid overflow)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    beta_k = k * beta[..., None]
    L = (beta_k @ k.transpose(-1, -2)) * decay  # unit diagonal is implied by solve_triangular
    # one triangular solve for both right-hand sides: U = L^-1 beta v and W = L^-1 beta k e^G
    U, W = torch.linalg.solve_triangular(
        L, torch.cat((v * beta[..., None], beta_k * G.exp()[..., None]), dim=-1), upper=False, unitriangular=True
    ).split((dv, dk), dim=-1)

    qk = (q @ k.transpose(-1, -2)) * decay  # intra-block attention, diagonal included
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    block_decay = G[..., -1].exp()[..., None, None]  # [B, H, n, 1, 1]

    outputs = torch.empty(B, H, n, chunk, dv, dtype=q.dtype, device=q.device)
    for i in range(n):
        delta = U[:, :, i] - W[:, :, i] @ state
        outputs[:, :, i] = q_decayed[:, :, i] @ state + qk[:, :, i] @ delta
        state = state * block_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ delta
    return outputs.reshape(B, H, n * chunk, dv)[:, :, :T], state


def gated_delta_rule(q, k, v, g, beta, state):
    """Dispatch: one token (decode) steps the recurrence; more run the chunked form."""
    if q.shape[2] == 1:
        return recurrent(q, k, v, g, beta, state)
    return chunked(q, k, v, g, beta, state)
