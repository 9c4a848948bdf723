"""The specification of the neural-memory update: a plain loop over tokens.

Slow and obviously correct. Every fast path in `chunk.py` is tested against this function; nothing else
should call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-5


def memory_forward(weights: list[Tensor], x: Tensor, residual: bool, layer_norm: bool,
                   ln_eps: float = LN_EPS) -> Tensor:
    """M_W(x) = x + LN(f_W(x)), f_W(x) = gelu(... gelu(x W_1) ...) W_L. x: (B, H, D), W_i: (B, H, in, out)."""
    h = x
    for i, w in enumerate(weights):
        h = torch.einsum("bhi,bhio->bho", h, w)
        if i < len(weights) - 1:
            h = F.gelu(h)  # exact erf GELU
    if layer_norm:
        h = F.layer_norm(h, h.shape[-1:], eps=ln_eps)
    return x + h if residual else h


def memory_update_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: tuple[Tensor, ...],
    momentum: tuple[Tensor, ...],
    *,
    chunk_size: int = 16,
    residual: bool = True,
    layer_norm: bool = True,
    ln_eps: float = LN_EPS,
    reset: Tensor | None = None,
    mask: Tensor | None = None,
    initial: tuple[Tensor, ...] | None = None,
    forget_to: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Token loop with `torch.func.grad`; same signature and meaning as `memory_update`.

    With `reset` / `mask` (documents packed in a row): each row's present tokens are cut into documents at the
    resets and each document runs alone through this loop, from `initial` and zero momentum (the row's first
    document, unless it starts with a reset, from the given state); the outputs are put back in place.

    For every token t: u_t = grad_W ||M_{W_anchor}(k_t) - v_t||^2 (anchor = weights at the start of t's chunk,
    chunks aligned to t = 0), S_t = eta_t S_{t-1} - theta_t u_t, W_t = (1 - alpha_t) W_{t-1} + S_t,
    y_t = M_{W_t}(q_t). `theta` may be (B, H, T) or (B, H, T, L) (one rate per memory layer).

    `alpha` may be (B, H, T) or (B, H, T, D) (channel-wise): then row r of the first layer's weights (input
    channel r, the key/query feature r) decays with alpha_t[r], W1_t = diag(1 - alpha_t) W1_{t-1} + S1_t, and every
    later layer with the channel mean alpha_t.mean(-1).

    `forget_to` (weights shaped like `weights`): the gate decays towards them instead of zero,
    W_t = (1 - alpha_t) W_{t-1} + alpha_t forget_to + S_t (with the channel-wise gate, per row like the decay).
    """
    if reset is not None or mask is not None:
        return _by_document(q, k, v, theta, eta, alpha, weights, momentum, reset, mask, initial,
                            chunk_size=chunk_size, residual=residual, layer_norm=layer_norm, ln_eps=ln_eps,
                            forget_to=forget_to)
    n_layers = len(weights)
    T = q.shape[2]
    if theta.dim() == 3:
        theta = theta.unsqueeze(-1).expand(*theta.shape, n_layers)

    def inner_loss(ws: tuple[Tensor, ...], k_t: Tensor, v_t: Tensor) -> Tensor:
        # Summing over (B, H) keeps the gradient per (B, H): each head's loss only sees its own weights.
        return (memory_forward(list(ws), k_t, residual, layer_norm, ln_eps) - v_t).pow(2).sum()

    grad_fn = torch.func.grad(inner_loss)
    W, S = list(weights), list(momentum)
    anchor = tuple(W)
    # keep[i][:, :, t] multiplies W_i at token t: (1 - alpha_t), broadcast over the weights
    if alpha.dim() == 4:  # channel-wise: row r of layer 1 keeps 1 - alpha_t[r], later layers 1 - mean_r alpha_t[r]
        keep = [1 - alpha[..., None]] + [1 - alpha.mean(-1)[..., None, None]] * (n_layers - 1)  # (B, H, T, D|1, 1)
    else:
        keep = [1 - alpha[..., None, None]] * n_layers  # (B, H, T, 1, 1)
    ys = []
    for t in range(T):
        if t % chunk_size == 0:
            anchor = tuple(W)
        u = grad_fn(anchor, k[:, :, t], v[:, :, t])
        for i in range(n_layers):
            S[i] = eta[:, :, t, None, None] * S[i] - theta[:, :, t, i, None, None] * u[i]
            W[i] = keep[i][:, :, t] * W[i] + S[i]
            if forget_to is not None:
                W[i] = W[i] + (1 - keep[i][:, :, t]) * forget_to[i]
        ys.append(memory_forward(W, q[:, :, t], residual, layer_norm, ln_eps))
    return torch.stack(ys, dim=2), tuple(W), tuple(S)


def _by_document(q, k, v, theta, eta, alpha, weights, momentum, reset, mask, initial, forget_to=None, **kw):
    B, H, T, D = q.shape
    y = q.new_zeros(B, H, T, D)
    W_out, S_out = [], []
    for r in range(B):
        present = torch.ones(T, dtype=torch.bool) if mask is None else mask[r].cpu()
        starts = torch.zeros(T, dtype=torch.bool) if reset is None else reset[r].cpu() & present
        tokens = torch.nonzero(present).flatten().tolist()
        docs = []  # lists of token indices
        for t in tokens:
            if starts[t] or not docs:
                docs.append([bool(starts[t])])
            docs[-1].append(t)
        W = tuple(w[r : r + 1] for w in weights)
        S = tuple(s[r : r + 1] for s in momentum)
        for is_reset, *idx in docs:
            if is_reset:
                W, S = tuple(w0[r : r + 1] for w0 in initial), tuple(torch.zeros_like(s) for s in S)
            pick = lambda x: x[r : r + 1, :, idx]  # noqa: E731
            target = None if forget_to is None else tuple(w[r : r + 1] if w.shape[0] > 1 else w for w in forget_to)
            y_doc, W, S = memory_update_reference(*map(pick, (q, k, v, theta, eta, alpha)), W, S, forget_to=target, **kw)
            y[r, :, idx] = y_doc[0]
        W_out.append(W)
        S_out.append(S)
    return y, tuple(map(torch.cat, zip(*W_out))), tuple(map(torch.cat, zip(*S_out)))
