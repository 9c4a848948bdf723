"""The chunked dual form as one autograd.Function with a hand-written backward (TITANS.md section 2).

Same math as `chunk.chunk_step`, organised for few, large kernels and no autograd graph inside the op:

forward (no graph), per segment of K chunks:
  1. a sequential loop over the segment's chunks that only advances the anchor state: the keys through the
     anchor weights, the inner-loss errors delta (closed-form LN backward and GELU'), and the rank-b state
     update, written straight into a reused workspace of K + 1 states (no stacks);
  2. the query side (every token read with its own weights through the causal b x b form) batched over the
     segment's chunks.
backward, per segment in reverse:
  1. recompute the segment's anchors and intermediates from its checkpoint (the forward's steps 1 and 2);
  2. the query side's backward batched over the segment;
  3. a reverse loop over its chunks carrying (dW, dS): the state update's backward, then the key side's
     backward, which is a second-order derivative (through the LN backward and GELU': GELU'' and the
     LN-backward's own derivative, derived by hand below).

Memory traffic, not FLOPs, decides the design on CPU: storing every chunk's anchors (N full states, 256 MB at
T=2048, chunk 16) costs more than the whole op (fresh pages fault in at ~3 GB/s). So the forward keeps only one
state checkpoint per segment of K chunks; the backward recomputes a segment's anchors (and its key-side and
query-side intermediates) from its checkpoint into a small reused workspace, then runs that segment's backward.
Cost: one extra forward pass (about +1/3 FLOPs); working set: K states.

Each memory layer's anchor state is one (BH, 2, in, out) block [W; S], so that the elementwise state updates,
the rank-b updates of both halves and the state dot products are single kernels over contiguous memory.

Coefficients (Bc, F, G, chunk-end rows) come in as tensors and get gradients; `chunk.py` derives them from the
rates with autograd, outside this Function. Not twice differentiable.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

LN_EPS = 1e-5
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_gelu_bwd = torch.ops.aten.gelu_backward.default


def _gelu_grad2(z: Tensor) -> Tensor:
    """GELU''(z) = phi(z) (2 - z^2)."""
    return torch.exp(-0.5 * z * z).mul_(_INV_SQRT_2PI).mul_(2.0 - z * z)


_WS = threading.local()


def _workspace(key: str, shape, like: Tensor) -> Tensor:
    """A reused scratch tensor (fresh pages cost more than the work done in them). Only used within one call of
    forward() or backward(), never across them."""
    if like.device.type != "cpu":  # CUDA's caching allocator already reuses memory
        return like.new_empty(shape)
    cache = _WS.__dict__.setdefault("cache", {})
    k = (key, tuple(shape), like.dtype, like.device)
    t = cache.get(k)
    if t is None:
        if len(cache) > 64:
            cache.clear()
        t = cache[k] = like.new_empty(shape)
    return t


class _Seg:
    """Anchors and key-side intermediates of one segment of chunks (n0 .. n0 + K - 1)."""

    def __init__(self, q: Tensor, dims, K: int, layer_norm: bool):
        _, BH, b, D = q.shape
        L = len(dims) - 1
        self.st = [_workspace(f"st{l}", (K + 1, BH, 2, dims[l], dims[l + 1]), q) for l in range(L)]
        self.zs = [_workspace(f"z{l}", (K, BH, b, dims[l + 1]), q) for l in range(L)]
        self.acts = [None] + [_workspace(f"a{l}", (K, BH, b, dims[l]), q) for l in range(1, L)]
        self.es = [_workspace(f"e{l}", (K, BH, b, dims[l + 1]), q) for l in range(L - 1)]
        self.deltas = [_workspace(f"d{l}", (K, BH, b, dims[l + 1]), q) for l in range(L)]
        if layer_norm:
            self.ys = _workspace("y", (K, BH, b, D), q)
            self.rstds = _workspace("r", (K, BH, b, 1), q)
            self.g0s = _workspace("g0", (K, BH, b, D), q)


def _advance(seg: _Seg, k, v, keep, Fe, GS, dims, n0: int, n1: int, residual: bool, layer_norm: bool):
    """Key side and state update for chunks n0 .. n1-1; seg.st[l][0] must hold chunk n0's anchor."""
    L = len(dims) - 1
    _, BH, b, D = k.shape
    seg.acts[0] = k[n0:n1]
    for j, n in enumerate(range(n0, n1)):
        a = k[n]
        for l in range(L):
            torch.bmm(a, seg.st[l][j][:, 0], out=seg.zs[l][j])
            if l < L - 1:
                a = torch.nn.functional.gelu(seg.zs[l][j])
                seg.acts[l + 1][j] = a
        f = seg.zs[L - 1][j]
        if layer_norm:
            y, mu, rstd = torch.native_layer_norm(f, [D], None, None, LN_EPS)
            g0 = (y + k[n] if residual else y.clone()).sub_(v[n]).mul_(2.0)
            g = torch.ops.aten.native_layer_norm_backward(g0, f, [D], mu, rstd, None, None, [True, False, False])[0]
            seg.ys[j], seg.rstds[j], seg.g0s[j] = y, rstd, g0
        else:
            g = (f + k[n] if residual else f).sub(v[n]).mul_(2.0)
        seg.deltas[L - 1][j] = g
        for l in range(L - 2, -1, -1):
            torch.bmm(seg.deltas[l + 1][j], seg.st[l + 1][j][:, 0].transpose(-1, -2), out=seg.es[l][j])
            seg.deltas[l][j] = _gelu_bwd(seg.es[l][j], seg.zs[l][j])
        for l in range(L):
            i, o = dims[l], dims[l + 1]
            cur, nxt = seg.st[l][j], seg.st[l][j + 1]
            aT = seg.acts[l][j].transpose(-1, -2)
            nM = seg.deltas[l][j].unsqueeze(1) * GS[n, :, l].unsqueeze(-1).neg()  # -[G_end delta; S_end delta]
            uW = torch.bmm(aT, nM[:, 0], out=_workspace(f"uW{l}", (BH, i, o), k))
            uS = torch.bmm(aT, nM[:, 1], out=_workspace(f"uS{l}", (BH, i, o), k))
            torch.addcmul(uW, cur[:, 0], keep[n, :, 0], out=nxt[:, 0])  # Bc_e W - a^T (G_end delta)
            nxt[:, 0].addcmul_(cur[:, 1], Fe[n])  # + F_e S
            torch.addcmul(uS, cur[:, 1], keep[n, :, 1], out=nxt[:, 1])  # P_e S - a^T (S_end delta)


def _read(seg: _Seg, q, BF, G, dims, n0: int, n1: int):
    """Query side of chunks n0 .. n1-1, batched: Z = Bc * (X W) + F * (X S) - (G * X A^T) Delta."""
    L = len(dims) - 1
    _, BH, b, D = q.shape
    KB = (n1 - n0) * BH
    h = q[n0:n1].reshape(KB, b, D)
    BFv = BF[n0:n1].reshape(KB, 2, b, 1)
    hs, zqs, hWSs, hAs = [], [], [], []
    for l in range(L):
        i, o = dims[l], dims[l + 1]
        WS = seg.st[l][: n1 - n0].view(KB, 2, i, o)
        hW = torch.bmm(h, WS[:, 0], out=_workspace(f"hW{l}", (KB, b, o), q))
        hS = torch.bmm(h, WS[:, 1], out=_workspace(f"hS{l}", (KB, b, o), q))
        hA = torch.bmm(h, seg.acts[l][: n1 - n0].reshape(KB, b, i).transpose(1, 2))
        z = torch.mul(hW, BFv[:, 0])
        z.addcmul_(hS, BFv[:, 1])
        z.baddbmm_(hA * G[n0:n1, :, l].reshape(KB, b, b), seg.deltas[l][: n1 - n0].view(KB, b, o), alpha=-1.0)
        hs.append(h)
        hWSs.append((hW, hS))
        hAs.append(hA)
        zqs.append(z)
        h = torch.nn.functional.gelu(z) if l < L - 1 else z
    return h, hs, zqs, hWSs, hAs


class ChunkedMemory(torch.autograd.Function):
    """Inputs (chunk-major, N chunks of b tokens, BH = batch * heads):
    q, k, v: (N, BH, b, D); BF: (N, BH, 2, b) rows [Bc_i; F_i]; G: (N, BH, L, b, b);
    E3: (N, BH, 3) chunk-end [Bc_e, P_e, F_e]; GS: (N, BH, L, 2, b) chunk-end rows [G[b-1, j]; Deta[b-1, j] theta_j];
    state: W_1..W_L, S_1..S_L, each (BH, in, out).
    Returns the queries' last-layer pre-norm outputs (N, BH, b, D) and the final W_1..W_L, S_1..S_L.
    """

    SEGMENT = 8  # chunks per checkpoint segment

    @staticmethod
    def forward(ctx, residual: bool, layer_norm: bool, q, k, v, BF, G, E3, GS, *state):
        L = len(state) // 2
        N, BH, b, D = q.shape
        dims = [D] + [w.shape[-1] for w in state[:L]]
        K = min(ChunkedMemory.SEGMENT, N)
        n_seg = -(-N // K)
        keep = E3[..., :2].reshape(N, BH, 2, 1, 1)  # [Bc_e, P_e] for [W; S]
        Fe = E3[..., 2].reshape(N, BH, 1, 1)
        seg = _Seg(q, dims, K, layer_norm)
        ckpt = [q.new_empty(n_seg, BH, 2, dims[l], dims[l + 1]) for l in range(L)]
        for l in range(L):
            seg.st[l][0, :, 0] = state[l]
            seg.st[l][0, :, 1] = state[L + l]
        out = torch.empty_like(q)
        for s in range(n_seg):
            n0, n1 = s * K, min(N, (s + 1) * K)
            for l in range(L):
                if s > 0:
                    seg.st[l][0] = seg.st[l][K]
                ckpt[l][s] = seg.st[l][0]
            _advance(seg, k, v, keep, Fe, GS, dims, n0, n1, residual, layer_norm)
            out[n0:n1] = _read(seg, q, BF, G, dims, n0, n1)[0].view(n1 - n0, BH, b, D)
        last = (N - 1) % K + 1
        finals = [seg.st[l][last, :, 0].clone() for l in range(L)] + [seg.st[l][last, :, 1].clone() for l in range(L)]
        ctx.residual, ctx.layer_norm, ctx.dims, ctx.K = residual, layer_norm, dims, K
        ctx.save_for_backward(q, k, v, BF, G, E3, GS, *ckpt)
        return (out, *finals)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *dfinal):
        q, k, v, BF, G, E3, GS, *ckpt = ctx.saved_tensors
        residual, layer_norm, dims, K = ctx.residual, ctx.layer_norm, ctx.dims, ctx.K
        L = len(dims) - 1
        N, BH, b, D = q.shape
        n_seg = -(-N // K)
        keep = E3[..., :2].reshape(N, BH, 2, 1, 1)
        Fe = E3[..., 2].reshape(N, BH, 1, 1)
        seg = _Seg(q, dims, K, layer_norm)
        if dout is None:
            dout = torch.zeros_like(q)

        carry = []
        for l in range(L):
            dW, dS = dfinal[l], dfinal[L + l]
            c = q.new_zeros(BH, 2, dims[l], dims[l + 1])
            if dW is not None:
                c[:, 0] = dW
            if dS is not None:
                c[:, 1] = dS
            carry.append(c)
        spare = [torch.empty_like(c) for c in carry]  # ping-pong: no fresh state-sized tensors per chunk
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dBF = q.new_empty(N, BH, 2, b)
        dG = q.new_empty(N, BH, L, b, b)
        dGS = q.new_empty(N, BH, L, 2, b)
        dE3 = q.new_empty(N, BH, 2, 2)  # [[<W, dW'>, <W, dS'>], [<S, dW'>, <S, dS'>]] summed over layers

        for s in range(n_seg - 1, -1, -1):
            n0, n1 = s * K, min(N, (s + 1) * K)
            Ks, KB = n1 - n0, (n1 - n0) * BH
            for l in range(L):
                seg.st[l][0] = ckpt[l][s]
            _advance(seg, k, v, keep, Fe, GS, dims, n0, n1, residual, layer_norm)
            _, hs, zqs, hWSs, hAs = _read(seg, q, BF, G, dims, n0, n1)

            # ---- query side backward, batched over the segment --------------------------------------------
            dz = dout[n0:n1].reshape(KB, b, D)
            BFv = BF[n0:n1].reshape(KB, 2, b, 1)
            Xs, ddelta_q, da_q = [None] * L, [None] * L, [None] * L
            dBFs = 0
            for l in range(L - 1, -1, -1):
                i, o = dims[l], dims[l + 1]
                WS = seg.st[l][:Ks].view(KB, 2, i, o)
                X = torch.mul(dz.unsqueeze(1), BFv, out=_workspace(f"X{l}", (KB, 2, b, o), q))  # [Bc dz; F dz]
                Xs[l] = X.view(Ks, BH, 2, b, o)
                dh = torch.bmm(X[:, 0], WS[:, 0].transpose(-1, -2), out=_workspace(f"dh{l}", (KB, b, i), q))
                dh.baddbmm_(X[:, 1], WS[:, 1].transpose(-1, -2))
                hW, hS = hWSs[l]
                dBFs = dBFs + torch.stack([(dz * hW).sum(-1), (dz * hS).sum(-1)], dim=1)
                Gl = G[n0:n1, :, l].reshape(KB, b, b)
                dsc = torch.bmm(dz, seg.deltas[l][:Ks].view(KB, b, o).transpose(1, 2)).neg_()
                ddelta_q[l] = torch.bmm((hAs[l] * Gl).transpose(1, 2), dz).neg_().view(Ks, BH, b, o)
                dG[n0:n1, :, l] = (dsc * hAs[l]).view(Ks, BH, b, b)
                dM = dsc.mul_(Gl)
                dh.baddbmm_(dM, seg.acts[l][:Ks].reshape(KB, b, i))
                da_q[l] = torch.bmm(dM.transpose(1, 2), hs[l]).view(Ks, BH, b, i)
                dz = _gelu_bwd(dh, zqs[l - 1]) if l > 0 else dh
            dq[n0:n1] = dz.view(Ks, BH, b, D)
            dBF[n0:n1] = dBFs.view(Ks, BH, 2, b)
            hsv = [hs[l].view(Ks, BH, b, dims[l]) for l in range(L)]

            gps = [_gelu_bwd(torch.ones_like(seg.zs[l][:Ks]), seg.zs[l][:Ks]) for l in range(L - 1)]
            egs = [seg.es[l][:Ks] * _gelu_grad2(seg.zs[l][:Ks]) for l in range(L - 1)]

            # ---- reverse loop over the segment's chunks, carrying d[W; S] --------------------------------------
            for j in range(Ks - 1, -1, -1):
                n = n0 + j
                ddelta, da = [None] * L, [None] * L
                dE3n = 0
                for l in range(L):
                    i, o = dims[l], dims[l + 1]
                    C, WS = carry[l], seg.st[l][j]
                    a, dl = seg.acts[l][j], seg.deltas[l][j]
                    GSl = GS[n, :, l].unsqueeze(-1)  # (BH, 2, b, 1)
                    RW = torch.bmm(a, C[:, 0], out=_workspace(f"RW{l}", (BH, b, o), q))  # a dW'
                    RS = torch.bmm(a, C[:, 1], out=_workspace(f"RS{l}", (BH, b, o), q))  # a dS'
                    dGS[n, :, l, 0] = (RW * dl).sum(-1).neg_()
                    dGS[n, :, l, 1] = (RS * dl).sum(-1).neg_()
                    ddelta[l] = ddelta_q[l][j] - GSl[:, 0] * RW - GSl[:, 1] * RS
                    M = dl.unsqueeze(1) * GSl
                    da[l] = torch.baddbmm(da_q[l][j], M[:, 0], C[:, 0].transpose(-1, -2), alpha=-1.0)
                    da[l].baddbmm_(M[:, 1], C[:, 1].transpose(-1, -2), alpha=-1.0)
                    dE3n = dE3n + torch.bmm(WS.view(BH, 2, i * o), C.view(BH, 2, i * o).transpose(1, 2))
                dE3[n] = dE3n

                # key side: delta chain backward (delta_l = (delta_{l+1} W_{l+1}^T) * GELU'(z_l))
                dzx = [None] * L
                lhs = [[seg.acts[l][j], hsv[l][j]] for l in range(L)]  # rank-b terms of dW_l: lhs^T @ rhs
                rhs = [[None, Xs[l][j][:, 0]] for l in range(L)]
                for l in range(L - 1):
                    de = ddelta[l] * gps[l][j]
                    dzx[l] = ddelta[l] * egs[l][j]
                    ddelta[l + 1] = ddelta[l + 1].baddbmm(de, seg.st[l + 1][j][:, 0])
                    lhs[l + 1].append(de)
                    rhs[l + 1].append(seg.deltas[l + 1][j])
                dg = ddelta[L - 1]
                if layer_norm:
                    y, rstd, g0 = seg.ys[j], seg.rstds[j], seg.g0s[j]
                    g = seg.deltas[L - 1][j]

                    def proj(x):  # x - mean(x) - y mean(x y): the LN backward's projection (symmetric)
                        return x - x.mean(-1, keepdim=True) - y * (x * y).mean(-1, keepdim=True)

                    dg0 = rstd * proj(dg)
                    c = (g0 * y).mean(-1, keepdim=True)
                    dy = 2.0 * dg0 - rstd * (c * dg + (dg * y).mean(-1, keepdim=True) * g0)
                    df = rstd * (proj(dy) - (dg * g).mean(-1, keepdim=True) * y)
                    dres = 2.0 * dg0
                else:
                    df = 2.0 * dg
                    dres = df
                torch.neg(dres, out=dv[n])
                # forward chain backward (z_l = a_l W_l, a_{l+1} = gelu(z_l))
                dzl = df
                for l in range(L - 1, -1, -1):
                    W = seg.st[l][j][:, 0]
                    rhs[l][0] = dzl
                    if l > 0:
                        da[l].baddbmm_(dzl, W.transpose(1, 2))
                        dzl = da[l].mul_(gps[l - 1][j]).add_(dzx[l - 1])
                    else:
                        dkn = torch.baddbmm(da[0], dzl, W.transpose(1, 2))
                        if residual:
                            dkn += dres
                        dk[n] = dkn
                # next carry: d[W; S] at chunk n's anchor = mix of the carried one + rank-b terms
                for l in range(L):
                    i, o = dims[l], dims[l + 1]
                    C = carry[l]
                    nc = spare[l]
                    kW = torch.bmm(torch.cat(lhs[l], dim=1).transpose(1, 2), torch.cat(rhs[l], dim=1),
                                   out=_workspace(f"uW{l}", (BH, i, o), q))
                    kS = torch.bmm(hsv[l][j].transpose(1, 2), Xs[l][j][:, 1], out=_workspace(f"uS{l}", (BH, i, o), q))
                    torch.addcmul(kW, C[:, 0], keep[n, :, 0], out=nc[:, 0])  # Bc_e dW' + ...
                    torch.addcmul(kS, C[:, 1], keep[n, :, 1], out=nc[:, 1])  # P_e dS' + ...
                    nc[:, 1].addcmul_(C[:, 0], Fe[n])  # + F_e dW'
                    spare[l], carry[l] = C, nc

        dW0 = [carry[l][:, 0].contiguous() for l in range(L)]
        dS0 = [carry[l][:, 1].contiguous() for l in range(L)]
        dE3 = torch.stack([dE3[..., 0, 0], dE3[..., 1, 1], dE3[..., 1, 0]], dim=-1)
        return (None, None, dq, dk, dv, dBF, dG, dE3, dGS, *dW0, *dS0)
