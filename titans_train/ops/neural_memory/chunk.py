"""Fast path of the neural-memory update: the chunked dual form (TITANS.md section 2).

Inside a memory chunk of b tokens all inner gradients are taken at the chunk-start ("anchor") weights, so the
recurrence S_t = eta_t S_{t-1} - theta_t u_t, W_t = (1 - alpha_t) W_{t-1} + S_t is linear in the u_t and has a
closed form. Each u_t is an outer product a_t^T delta_t per memory layer, which lets the retrieval of every token
with its own weights W_t be written as a causal b x b "attention" against the chunk's keys:

    Z_q = diag(Bc) X_q W_0 + diag(F) X_q S_0 - (G * (X_q X_k^T)) Delta

No per-token weights or per-token gradients are materialised. The only sequential loop is over chunks, batched
over (batch, head). Each chunk's queries are read inside the loop while its anchor weights are still in cache:
a variant that stacked every chunk's anchors and read all queries in one batched pass afterwards was slower on
CPU (the stacks are copies of N full states, memory-bound) - see BENCHMARKS.md.

Channel-wise alpha ((B, H, T, D), `channel_first_layer`): the first layer's rows decay per channel,
W1_i = diag(1 - alpha_i) W1_{i-1} + S1_i, so its coefficients gain a channel index r (Bc1[i, r], F1[i, r],
G1[i, j, r]) and its scores become a channel-weighted inner product sum_r q_i[r] G1[i, j, r] k_j[r]; the later
layers use the scalar coefficients of the channel mean. Layer 1's inputs are q and k themselves, so all of that is
computed before the chunk loop (a few chunks at a time, recomputed in the backward: the (b, b, D) tensors are never
kept), and the loop's step only swaps layer 1's coefficients. Only `chunk_step` implements it (not the kernels).

Three implementations share the coefficients below: `chunk_step` under autograd (optionally torch.compile'd; the
only one with channel-wise alpha), `cpu.CpuChunkedMemory` (a compiled C++ kernel with a hand-written backward: each
(batch, head) item's chunk loop on one core, the default on CPU) and `triton_kernel.TritonChunkedMemory` (the same
design as Triton kernels, one program per item, the default on CUDA); `memory_update_chunked(impl=...)` picks one
(`choose_impl`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from . import cpu as cpu_kernel
from .cpu import CpuChunkedMemory, pack_target

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


def segsum_channels(x: Tensor) -> Tensor:
    """`segsum` along dim -2 with the channels last: x (..., b, D) -> out[..., i, j, r] = sum_{k=j+1..i} x[..., k, r]
    for j <= i (0 on the diagonal), -inf above it; (..., b, b, D).

    A matmul with the 0/1 matrix M[(i, j), k] = [j < k <= i]: the same terms as `segsum`'s masked cumsum (direct
    sums, no differences of cumsums), and faster than a cumsum over a non-contiguous dim for these sizes.
    """
    b = x.shape[-2]
    idx = torch.arange(b, device=x.device)
    k, j, i = idx, idx[:, None], idx[:, None, None]
    M = ((j < k) & (k <= i)).to(x.dtype).view(b * b, b)
    out = (M @ x).unflatten(-2, (b, b))  # (..., b_i, b_j, D)
    lower = torch.ones(b, b, dtype=torch.bool, device=x.device).tril()[..., None]
    return out.masked_fill(~lower, float("-inf"))


def channel_first_layer(q: Tensor, k: Tensor, theta1: Tensor, deta: Tensor, P: Tensor, alpha: Tensor, last: Tensor):
    """Channel-wise alpha: everything the first memory layer needs from its per-channel decay, for a few chunks.

    q, k, alpha: (BH, n, b, D); theta1 (the first layer's theta), P: (BH, n, b); deta: (BH, n, b, b), P and deta
    from `chunk_coefficients`; last: (BH, n) the row of each chunk's last real token (-1: the chunk hands its
    state on unchanged, see `memory_update_chunked`). Row r of W1 decays with
    alpha[..., r]; with chunk-local indices and E1[i, l, r] = prod_{k=l+1..i} (1 - alpha_k[r]) (a segment sum of
    logs, like E):
      Bc1[i, r] = prod_{k<=i} (1 - alpha_k[r]),  F1[i, r] = sum_l E1[i, l, r] P_l,
      G1[i, j, r] = sum_l E1[i, l, r] Deta[l, j] theta1_j,
    and W1_i = diag(Bc1_i) W1_0 + diag(F1_i) S1_0 - sum_j diag(G1[i, j]) u1_j. With u1_j = k_j^T delta_j the decay
    scales channel r of k_j, so query i of the chunk reads (layer 1's input is q itself)
      z_i = (Bc1_i * q_i) W1_0 + (F1_i * q_i) S1_0 - sum_j scores[i, j] delta_j,
      scores[i, j] = sum_r q_i[r] G1[i, j, r] k_j[r]                       (a channel-weighted q_i . k_j)
    and the chunk-end state is W1_e[r, :] = Bc1_e[r] W1_0[r, :] + F1_e[r] S1_0[r, :] - ((G1[e] * k)^T Delta)[r, :].
    None of it depends on the anchor weights, so it runs before the chunk loop, which only sees small tensors.

    Returns Bc1 * q, F1 * q (BH, n, b, D), scores (BH, n, b, b), Bc1_e, F1_e (BH, n, D), G1[e] * k (BH, n, b, D).
    """
    b = q.shape[-2]
    log_keep = _safe_log(1.0 - alpha)  # (BH, n, b, D)
    decay = torch.exp(segsum_channels(log_keep))  # E1 (BH, n, b_i, b_l, D)
    Bc1 = torch.exp(torch.cumsum(log_keep, dim=-2))  # (BH, n, b, D)
    # G1 and F1 in one matmul per row i: rows j of DT[j, l] = Deta[l, j] theta1_j, then one row P_l.
    R = torch.cat([(deta * theta1.unsqueeze(-2)).transpose(-1, -2), P.unsqueeze(-2)], dim=-2)  # (BH, n, b + 1, b)
    G1, F1 = (R.unsqueeze(-3) @ decay).split([b, 1], dim=-2)  # (BH, n, b_i, b_j, D), (BH, n, b_i, 1, D)
    F1 = F1.squeeze(-2)
    scores = (G1 * (q.unsqueeze(-2) * k.unsqueeze(-3))).sum(-1)  # (BH, n, b, b), lower triangular
    Bc1_e, F1_e, G1_e = (_end_row(x, last, 2) for x in (Bc1, F1, G1))  # (BH, n, D), (BH, n, D), (BH, n, b, D)
    keep = (last >= 0)[..., None]  # (BH, n, 1)
    return (Bc1 * q, F1 * q, scores, torch.where(keep, Bc1_e, 1.0), torch.where(keep, F1_e, 0.0),
            torch.where(keep[..., None], G1_e * k, 0.0))


def _end_row(x: Tensor, last: Tensor, dim: int) -> Tensor:
    """x[bh, n, ..., last[bh, n], ...] with the row index at `dim` (>= 2) removed; last (BH, n), -1 read as 0."""
    idx = last.clamp_min(0).view(*last.shape, *([1] * (x.dim() - 2))).expand(*x.shape[:dim], 1, *x.shape[dim + 1:])
    return x.gather(dim, idx).squeeze(dim)


# Chunks per call of `channel_first_layer` so that its (BH, n, b, b, D) tensors stay about this many elements (a few
# MB, cache-sized): the backward recomputes them (torch.utils.checkpoint) instead of keeping them, so the memory
# they take does not grow with T.
CHANNEL_GROUP_ELEMENTS = 1 << 19


def chunk_step(xq, xk, v, W, S, Bc_rows, F_rows, G, P_e, Bc_e, F_e, G_end, S_end, residual: bool, layer_norm: bool,
               ln_eps: float, first: tuple[Tensor, ...] | None = None, target: list[Tensor] | None = None):
    """One memory chunk, batched over (batch, head): read its queries, then advance the anchor state.

    xq, xk, v: (BH, b, D); W, S: lists of L anchors (BH, in, out); Bc_rows, F_rows: (BH, b, 1); G: (BH, L, b, b);
    P_e, Bc_e, F_e: (BH, 1, 1) chunk-end coefficients; G_end, S_end: (BH, L, b, 1) chunk-end rows of G and of
    Deta * theta. `first`: channel-wise alpha only, the first layer's terms from `channel_first_layer` (Bc1 * xq,
    F1 * xq (BH, b, D), scores (BH, b, b), Bc1_e, F1_e (BH, D, 1), G1[e] * xk (BH, b, D)), used for layer 1.
    `target`: the weights the gate decays towards (B or 1, H, in, out) per layer (broadcast over the batch rows),
    None for zero: the decayed part of the anchor, (1 - Bc) W_0 in the dual form below, moves to them,
    W_i = Bc_i W + (1 - Bc_i) target + ....
    Returns the queries' last-layer pre-norm outputs (BH, b, D) and the next anchors.
    """
    L = len(W)
    # Keys at the anchor weights: activations a_l and errors delta_l of the inner loss, u_j = a_j^T delta_j.
    acts, zs = [xk], []
    for l in range(L):
        zs.append(acts[-1] @ W[l])
        if l < L - 1:
            acts.append(F.gelu(zs[-1]))
    f = zs[-1]
    if layer_norm:
        fc = f - f.mean(dim=-1, keepdim=True)
        rstd = torch.rsqrt(fc.pow(2).mean(dim=-1, keepdim=True) + ln_eps)
        fhat = fc * rstd
        g = 2.0 * ((fhat + xk if residual else fhat) - v)
        # LayerNorm backward (no affine): rstd * (g - mean(g) - fhat * mean(g * fhat))
        g = rstd * (g - g.mean(dim=-1, keepdim=True) - fhat * (g * fhat).mean(dim=-1, keepdim=True))
    else:
        g = 2.0 * ((f + xk if residual else f) - v)
    deltas = [g] * L
    for l in range(L - 2, -1, -1):
        deltas[l] = (deltas[l + 1] @ W[l + 1].transpose(-1, -2)) * gelu_grad(zs[l])

    # Queries, each read with its own W_i: Z = diag(Bc) X W_0 + diag(F) X S_0 - (G * X X_k^T) Delta.
    # Done here, while the anchor weights are hot in cache, rather than batched over all chunks afterwards.
    h = xq
    for l in range(L):
        if l == 0 and first is not None:  # channel-wise: z = (Bc1 * X) W_0 + (F1 * X) S_0 - scores Delta
            scores, bh = first[2], first[0]
            z = torch.baddbmm(torch.bmm(bh, W[0]), first[1], S[0])
        else:
            scores = G[:, l] * (h @ acts[l].transpose(-1, -2))  # (BH, b, b), lower triangular
            bh = Bc_rows * h
            z = torch.baddbmm(torch.bmm(bh, W[l]), F_rows * h, S[l])
        if target is not None:  # (BH, b, in) as (B, H, b, in) @ (B or 1, H, in, out)
            H = target[l].shape[1]
            z = z + torch.matmul((h - bh).unflatten(0, (-1, H)), target[l]).flatten(0, 1)
        z = torch.baddbmm(z, scores, deltas[l], alpha=-1.0)
        h = F.gelu(z) if l < L - 1 else z

    # Chunk-end state: a rank-b update of the anchor.
    W_new, S_new = [], []
    for l in range(L):
        a_t = acts[l].transpose(-1, -2)  # (BH, in, b)
        if l == 0 and first is not None:  # W1[r] = Bc1_e[r] W1[r] + F1_e[r] S1[r] - ((G1[e] * X_k)^T Delta)[r]
            keep_e = first[3]
            w = torch.baddbmm(torch.addcmul(first[3] * W[0], first[4], S[0]), first[5].transpose(-1, -2), deltas[0],
                              alpha=-1.0)
        else:
            keep_e = Bc_e
            w = torch.baddbmm(torch.addcmul(Bc_e * W[l], F_e, S[l]), a_t, G_end[:, l] * deltas[l], alpha=-1.0)
        if target is not None:
            H = target[l].shape[1]
            w = w + ((1.0 - keep_e).unflatten(0, (-1, H)) * target[l]).flatten(0, 1)
        W_new.append(w)
        S_new.append(torch.baddbmm(P_e * S[l], a_t, S_end[:, l] * deltas[l], alpha=-1.0))
    return h, W_new, S_new


_COMPILED = None


def _compiled_step():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(chunk_step, dynamic=False, fullgraph=True)
    return _COMPILED


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
    ln_eps: float = LN_EPS,
    compile: bool = False,
    impl: str = "auto",
    last: Tensor | None = None,
    forget_to: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Validated-input implementation of `memory_update` (see `titans_train.ops.memory_update`).

    theta is (B, H, T, L) here (the wrapper expands a shared rate); alpha (B, H, T) or (B, H, T, D) (channel-wise,
    autograd step only). Computes in the dtype of q.

    `last` (B, N), with T = N * chunk_size: per batch row, the chunk-local row of each chunk's last real token, or
    -1 for a chunk without one; the state a chunk hands on is the one after that row (the tokens after it are
    padding), and a -1 chunk hands its incoming state on unchanged. `documents.py` lays documents out with it.
    Default: every chunk is full except the last (T need not be a multiple of chunk_size).
    """
    B, H, T, D = q.shape
    L = len(weights)
    b = min(chunk_size, T) if last is None else chunk_size
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
    channel = alpha.dim() == 4  # channel-wise alpha: layer 1 per channel, the later layers with the channel mean
    alpha_c = chunks(alpha)  # (BH, N, b) or (BH, N, b, D)
    c = chunk_coefficients(chunks(theta), chunks(eta, 1.0), alpha_c.mean(-1) if channel else alpha_c)
    # The state a chunk hands on is the one after its last real token (row b-1, or T-1's row in the last chunk);
    # a chunk without one (last = -1) hands on its incoming state: identity coefficients P = Bc = 1, F = G = 0.
    if last is None:
        last = torch.full((N,), b - 1, dtype=torch.long, device=q.device)
        last[-1] = (T - 1) - (N - 1) * b
        last = last.expand(BH, N)
    else:
        if last.shape != (B, N) or N * b != T:
            raise ValueError(f"last.shape={tuple(last.shape)} must be (B, N)={(B, N)} with T={T} = N * chunk_size")
        last = last.repeat_interleave(H, dim=0)  # (BH, N)
    keep = last >= 0
    end = {name: torch.where(keep, _end_row(c[name], last, 2), 0.0 if name == "F" else 1.0)
           for name in ("P", "Bc", "F")}  # (BH, N)
    G_end = torch.where(keep[..., None, None], _end_row(c["G"], last, 3), 0.0)  # (BH, N, L, b)
    S_end = torch.where(keep[..., None, None], _end_row(c["deta"], last, 2).unsqueeze(-2), 0.0) \
        * chunks(theta).movedim(-1, -2)  # (BH, N, L, b)

    W = [w.reshape(BH, *w.shape[2:]) for w in weights]  # (BH, in, out)
    S = [s.reshape(BH, *s.shape[2:]) for s in momentum]

    path = choose_impl(impl, compile, b, q, channel_alpha=channel, dims=[D] + [w.shape[-1] for w in weights])
    if path in ("cpu", "triton"):  # the hand-written backwards take the coefficients stacked
        BF = torch.stack([c["Bc"], c["F"]], dim=-2)  # (BH, N, 2, b)
        E3 = torch.stack([end["Bc"], end["P"], end["F"]], dim=-1)  # (BH, N, 3)
        GS = torch.stack([G_end, S_end], dim=-2)  # (BH, N, L, 2, b)
        # same inputs and outputs, (batch, head)-major
        # (B or 1, H, in, out) -> (BH or H, in, out): a view, so a target shared by the rows is never copied per row
        target = pack_target(None if forget_to is None else [w.reshape(-1, *w.shape[2:]) for w in forget_to], q)
        fn = CpuChunkedMemory if path == "cpu" else _triton().TritonChunkedMemory
        out, *state = fn.apply(residual, layer_norm, ln_eps, qc.contiguous(), kc.contiguous(), vc.contiguous(), BF,
                               c["G"].contiguous(), E3, GS, target, *(w.contiguous() for w in W),
                               *(s.contiguous() for s in S))
        return _finish(out, qc, state[:L], state[L:], B, H, T, D, residual, layer_norm, ln_eps)

    # unbind once: indexing chunk n inside the loop would make every backward step allocate a full-size gradient.
    q_chunks, k_chunks, v_chunks = qc.unbind(1), kc.unbind(1), vc.unbind(1)
    P_end, Bc_end, F_end = (end[name][..., None, None].unbind(1) for name in ("P", "Bc", "F"))  # (BH, 1, 1) each
    G_end_chunks = G_end[..., None].unbind(1)  # (BH, L, b, 1) each
    S_end_chunks = S_end[..., None].unbind(1)
    Bc_rows, F_rows = c["Bc"][..., None].unbind(1), c["F"][..., None].unbind(1)  # (BH, b, 1) each
    G_chunks = c["G"].unbind(1)  # (BH, L, b, b) each
    first = [None] * N
    if channel:
        first = _channel_terms(qc, kc, chunks(theta)[..., 0], c["deta"], c["P"], alpha_c, last)
    target = None if forget_to is None else list(forget_to)
    outs = []
    step = _compiled_step() if compile else chunk_step
    for n in range(N):
        out, W, S = step(
            q_chunks[n], k_chunks[n], v_chunks[n], W, S, Bc_rows[n], F_rows[n], G_chunks[n],
            P_end[n], Bc_end[n], F_end[n], G_end_chunks[n], S_end_chunks[n], residual, layer_norm, ln_eps, first[n],
            target,
        )
        outs.append(out)

    out = torch.stack(outs, dim=1)  # (BH, N, b, D)
    return _finish(out, qc, W, S, B, H, T, D, residual, layer_norm, ln_eps)


def _channel_terms(qc, kc, theta1, deta, P, alpha, last) -> list[tuple[Tensor, ...]]:
    """`channel_first_layer` over all N chunks, in groups of chunks (checkpointed when a gradient is needed), split
    into one tuple per chunk for `chunk_step`'s `first`."""
    BH, N, b, D = qc.shape
    group = max(1, CHANNEL_GROUP_ELEMENTS // (BH * b * b * D))
    parts = [x.split(group, dim=1) for x in (qc, kc, theta1, deta, P, alpha, last)]
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (qc, kc, theta1, deta, P, alpha))
    outs = []
    for args in zip(*parts):
        if needs_grad:
            outs.append(torch.utils.checkpoint.checkpoint(channel_first_layer, *args, use_reentrant=False))
        else:
            outs.append(channel_first_layer(*args))
    Bq, Fq, scores, Bc1_e, F1_e, Ke = (torch.cat(x, dim=1) if len(outs) > 1 else x[0] for x in zip(*outs))
    return list(zip(Bq.unbind(1), Fq.unbind(1), scores.unbind(1), Bc1_e[..., None].unbind(1), F1_e[..., None].unbind(1),
                    Ke.unbind(1)))


IMPLS = ("auto", "cpu", "triton", "autograd")


def _triton():
    """The Triton kernels (triton_kernel.py), imported on first use: triton is optional and its import is slow."""
    from . import triton_kernel

    return triton_kernel


def _triton_error(q: Tensor, dims, chunk: int) -> str | None:
    """Why the Triton kernels cannot run these inputs (None when they can)."""
    try:
        _triton().check_supported(q, dims, chunk)
    except ImportError as e:
        return f"triton is not installed ({e}); pip install triton (CUDA builds of torch ship it)"
    except ValueError as e:
        return str(e)
    return None


def choose_impl(impl: str, compile: bool, chunk: int, q: Tensor, channel_alpha: bool = False, dims=()) -> str:
    """Which implementation runs: "cpu" (the compiled CPU kernel, cpu.py), "triton" (triton_kernel.py) or "autograd"
    (the per-chunk step under autograd, compiled when compile=True).

    "auto" takes the CPU kernel for float32/float64 CPU tensors with scalar (per-head) alpha when it builds on this
    machine and compile=False, the Triton kernels for CUDA tensors with scalar alpha and compile=False when triton
    imports and supports the memory's widths (`dims`: D, hidden..., D) and chunk size, else the autograd step. An explicit choice
    that cannot run raises a ValueError (or a RuntimeError saying why the CPU kernel did not build)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if channel_alpha and impl in ("cpu", "triton"):  # scalar decay coefficients only
        raise ValueError(f"impl={impl!r} does not support channel-wise alpha (alpha of shape (B, H, T, D)); "
                         "use impl='autograd' or 'auto'")
    kernel_ok = q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
    if impl == "cpu":
        if not kernel_ok:
            raise ValueError(f"impl='cpu' needs float32/float64 CPU tensors, got {q.dtype} on {q.device}")
        if not cpu_kernel.available():
            raise RuntimeError(f"impl='cpu': the CPU kernel did not build ({cpu_kernel.build_error()})")
        return "cpu"
    if impl == "triton":
        why = _triton_error(q, dims, chunk)
        if why is not None:
            raise ValueError(why)
        return "triton"
    if impl == "auto":
        if kernel_ok and not channel_alpha and not compile and cpu_kernel.available():
            return "cpu"
        if q.is_cuda and not channel_alpha and not compile and _triton_error(q, dims, chunk) is None:
            return "triton"
        return "autograd"
    return impl


def _finish(out, qc, W, S, B, H, T, D, residual, layer_norm, ln_eps):
    BH, N, b = out.shape[:3]
    if layer_norm:
        out = F.layer_norm(out, out.shape[-1:], eps=ln_eps)
    if residual:
        out = out + qc
    y = out.reshape(BH, N * b, D)[:, :T].reshape(B, H, T, D)
    w_out = tuple(w.reshape(B, H, *w.shape[1:]) for w in W)
    s_out = tuple(s.reshape(B, H, *s.shape[1:]) for s in S)
    return y, w_out, s_out


def memory_apply(x: Tensor, weights: tuple[Tensor, ...], *, residual: bool = True, layer_norm: bool = True,
                 ln_eps: float = LN_EPS) -> Tensor:
    """Read the memory without writing it: M_W(x) for every token with one set of weights.

    x: (B, H, T, D); weights: L tensors (B, H, in, out). Returns (B, H, T, D).
    """
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = F.gelu(h)
    if layer_norm:
        h = F.layer_norm(h, h.shape[-1:], eps=ln_eps)
    return x + h if residual else h
