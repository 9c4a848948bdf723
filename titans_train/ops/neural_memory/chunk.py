"""Fast path of the neural-memory update: the chunked dual form (TITANS.md section 2).

Inside a memory chunk of b tokens all inner gradients are taken at the chunk-start ("anchor") weights, so the
recurrence S_t = eta_t S_{t-1} - theta_t u_t, W_t = (1 - alpha_t) W_{t-1} + S_t is linear in the u_t and has a
closed form. Each u_t is an outer product a_t^T delta_t per memory layer, which lets the retrieval of every token
with its own weights W_t be written as a causal b x b "attention" against the chunk's keys:

    Z_q = diag(Bc) X_q W_0 + diag(F) X_q S_0 - (G * (X_q X_k^T)) Delta

No per-token weights or per-token gradients are materialised. The only sequential loop is over chunks and it
carries just what the next chunk needs (anchor weights, momentum); the query side of every chunk is computed
afterwards in one batched pass over all chunks, which turns many small matmuls into a few large ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-5
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_grad(z: Tensor) -> Tensor:
    """d/dz of the exact GELU z * Phi(z): Phi(z) + z * phi(z). Differentiable (the outer loss needs GELU'')."""
    cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT2))
    return cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def segsum(x: Tensor) -> Tensor:
    """out[..., i, j] = sum_{k=j+1..i} x[..., k] for j <= i (0 on the diagonal), -inf above it.

    Built with a masked cumsum rather than a difference of cumsums, so no cancellation and no inf - inf.
    """
    b = x.shape[-1]
    x = x.unsqueeze(-1).expand(*x.shape, b)  # (..., b_k, b_j)
    strict = torch.ones(b, b, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~strict, 0.0).cumsum(dim=-2)
    lower = torch.ones(b, b, dtype=torch.bool, device=x.device).tril()
    return x.masked_fill(~lower, float("-inf"))


def _safe_log(x: Tensor) -> Tensor:
    # Rates of exactly 0 (e.g. sigmoid saturating in fp32) give log 0 = -inf and NaN gradients; clamping to the
    # smallest normal number changes products by < 1e-38 and keeps gradients finite.
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def chunk_coefficients(theta: Tensor, eta: Tensor, alpha: Tensor) -> dict[str, Tensor]:
    """Closed-form coefficients of every chunk at once.

    theta: (..., N, b, L), eta/alpha: (..., N, b). With chunk-local indices (token 0 = the chunk's first):
      P_i = prod_{k<=i} eta_k, Bc_i = prod_{k<=i} (1 - alpha_k), Deta[i, j] = prod_{k=j+1..i} eta_k,
      E[i, l] = prod_{k=l+1..i} (1 - alpha_k), F = E @ P, G_l = (E @ Deta) * theta_l[None, :].
    Then W_i = Bc_i W_0 + F_i S_0 - sum_j G[i, j] u_j and S_i = P_i S_0 - sum_j Deta[i, j] theta_j u_j.
    """
    log_eta, log_keep = _safe_log(eta), _safe_log(1.0 - alpha)
    deta = torch.exp(segsum(log_eta))  # (..., N, b, b)
    decay = torch.exp(segsum(log_keep))  # E
    P = torch.exp(torch.cumsum(log_eta, dim=-1))  # (..., N, b)
    Bc = torch.exp(torch.cumsum(log_keep, dim=-1))
    F_ = (decay @ P.unsqueeze(-1)).squeeze(-1)
    ED = decay @ deta  # (..., N, b, b)
    G = ED.unsqueeze(-3) * theta.movedim(-1, -2).unsqueeze(-2)  # (..., N, L, b, b)
    return {"deta": deta, "P": P, "Bc": Bc, "F": F_, "G": G}


def memory_update_chunked(
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
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Validated-input implementation of `memory_update` (see `titans_train.ops.memory_update`).

    theta is (B, H, T, L) here (the wrapper expands a shared rate). Computes in the dtype of q.
    """
    B, H, T, D = q.shape
    L = len(weights)
    b = min(chunk_size, T)
    N = -(-T // b)
    pad = N * b - T
    BH = B * H

    def chunks(x: Tensor, fill: float = 0.0) -> Tensor:
        # (B, H, T, ...) -> (BH, N, b, ...); padded tokens are no-ops for the state: theta 0, eta 1, alpha 0
        x = x.reshape(BH, T, *x.shape[3:])
        if pad:
            x = torch.cat([x, x.new_full((BH, pad, *x.shape[2:]), fill)], dim=1)
        return x.reshape(BH, N, b, *x.shape[2:])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)  # (BH, N, b, D)
    c = chunk_coefficients(chunks(theta), chunks(eta, 1.0), chunks(alpha))
    # The state a chunk hands on is the one after its last real token (row b-1, or T-1's row in the last chunk).
    last = torch.full((N,), b - 1, dtype=torch.long, device=q.device)
    last[-1] = (T - 1) - (N - 1) * b
    rows = torch.arange(N, device=q.device)
    end = {name: c[name][:, rows, last] for name in ("P", "Bc", "F")}  # (BH, N)
    G_end = c["G"].transpose(2, 3)[:, rows, last]  # (BH, N, L, b)
    S_end = c["deta"][:, rows, last].unsqueeze(-2) * chunks(theta).movedim(-1, -2)  # (BH, N, L, b)

    W = [w.reshape(BH, *w.shape[2:]) for w in weights]  # (BH, in, out)
    S = [s.reshape(BH, *s.shape[2:]) for s in momentum]
    anchors_W: list[list[Tensor]] = [[] for _ in range(L)]
    anchors_S: list[list[Tensor]] = [[] for _ in range(L)]
    key_acts: list[list[Tensor]] = [[] for _ in range(L)]  # input of layer l for the chunk's keys
    key_deltas: list[list[Tensor]] = [[] for _ in range(L)]  # d(inner loss)/d(output of layer l)

    # unbind once: indexing chunk n inside the loop would make every backward step allocate a full-size gradient.
    k_chunks, v_chunks = kc.unbind(1), vc.unbind(1)
    P_end, Bc_end, F_end = (end[name][..., None, None].unbind(1) for name in ("P", "Bc", "F"))
    G_end_chunks = G_end[..., None].unbind(1)  # each (BH, L, b, 1)
    S_end_chunks = S_end[..., None].unbind(1)
    for n in range(N):
        xk = k_chunks[n]  # (BH, b, D)
        acts, zs = [xk], []
        for l in range(L):
            zs.append(acts[-1] @ W[l])
            if l < L - 1:
                acts.append(F.gelu(zs[-1]))
        f = zs[-1]
        if layer_norm:
            fc = f - f.mean(dim=-1, keepdim=True)
            rstd = torch.rsqrt(fc.pow(2).mean(dim=-1, keepdim=True) + LN_EPS)
            fhat = fc * rstd
            g = 2.0 * ((fhat + xk if residual else fhat) - v_chunks[n])
            # LayerNorm backward (no affine): rstd * (g - mean(g) - fhat * mean(g * fhat))
            g = rstd * (g - g.mean(dim=-1, keepdim=True) - fhat * (g * fhat).mean(dim=-1, keepdim=True))
        else:
            g = 2.0 * ((f + xk if residual else f) - v_chunks[n])
        deltas = [g] * L
        for l in range(L - 2, -1, -1):
            deltas[l] = (deltas[l + 1] @ W[l + 1].transpose(-1, -2)) * gelu_grad(zs[l])

        P_e, Bc_e, F_e = P_end[n], Bc_end[n], F_end[n]  # (BH, 1, 1)
        for l in range(L):
            anchors_W[l].append(W[l])
            anchors_S[l].append(S[l])
            key_acts[l].append(acts[l])
            key_deltas[l].append(deltas[l])
            a_t = acts[l].transpose(-1, -2)  # (BH, in, b)
            w_new = torch.baddbmm(Bc_e * W[l] + F_e * S[l], a_t, G_end_chunks[n][:, l] * deltas[l], alpha=-1.0)
            S[l] = torch.baddbmm(P_e * S[l], a_t, S_end_chunks[n][:, l] * deltas[l], alpha=-1.0)
            W[l] = w_new

    # Query side of all chunks at once: token i of a chunk is read with its own weights W_i through the dual form.
    xq = qc
    Bc, F_ = c["Bc"].unsqueeze(-1), c["F"].unsqueeze(-1)  # (BH, N, b, 1)
    for l in range(L):
        W0 = torch.stack(anchors_W[l], dim=1)  # (BH, N, in, out)
        S0 = torch.stack(anchors_S[l], dim=1)
        xk = torch.stack(key_acts[l], dim=1)  # (BH, N, b, in)
        delta = torch.stack(key_deltas[l], dim=1)  # (BH, N, b, out)
        scores = c["G"][:, :, l] * (xq @ xk.transpose(-1, -2))  # (BH, N, b, b), lower triangular
        z = Bc * (xq @ W0) + F_ * (xq @ S0) - scores @ delta
        xq = F.gelu(z) if l < L - 1 else z
    out = xq
    if layer_norm:
        out = F.layer_norm(out, out.shape[-1:], eps=LN_EPS)
    if residual:
        out = out + qc
    y = out.reshape(BH, N * b, D)[:, :T].reshape(B, H, T, D)
    w_out = tuple(w.reshape(B, H, *w.shape[1:]) for w in W)
    s_out = tuple(s.reshape(B, H, *s.shape[1:]) for s in S)
    return y, w_out, s_out


def memory_apply(x: Tensor, weights: tuple[Tensor, ...], *, residual: bool = True, layer_norm: bool = True) -> Tensor:
    """Read the memory without writing it: M_W(x) for every token with one set of weights.

    x: (B, H, T, D); weights: L tensors (B, H, in, out). Returns (B, H, T, D).
    """
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = F.gelu(h)
    if layer_norm:
        h = F.layer_norm(h, h.shape[-1:], eps=LN_EPS)
    return x + h if residual else h
