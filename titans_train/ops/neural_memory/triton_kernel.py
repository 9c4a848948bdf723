"""The chunked dual form as Triton kernels (forward and hand-written backward), for CUDA GPUs.

Same math, inputs and outputs as `cpu.CpuChunkedMemory`, and the same organisation as `cpu_kernel.cpp`, whose
design it follows (the backward's derivation is in that file's comments): one program per (batch, head) item runs
the item's whole chunk loop, so there is one launch per op instead of hundreds of small kernels per memory chunk.
The fast-weight state ([W_l; S_l] per layer, fp32) ping-pongs between two per-item buffers (a few hundred KB, in
L2); every matmul against a state matrix is tiled (KT rows or columns of the state at a time), so registers and
shared memory hold tiles and chunk-sized (b x hidden) blocks, never a whole 64 x 256 matrix. Per-chunk intermediates
go through a per-item scratch (written, then read after a barrier by other threads of the program). The backward
recomputes each segment of SEGMENT chunks from one state checkpoint stored by the forward.

Coefficients (Bc, F, G, chunk-end rows) come in as tensors, built with autograd by `chunk.py` (as for the CPU
kernel). Matmuls take fp32 (or fp64) inputs: exact fp32 by default, TF32 tensor cores where
`torch.backends.cuda.matmul.allow_tf32` is set (`torch.set_float32_matmul_precision("high")`); accumulation and
state are fp32 either way. Block sizes: the chunk is padded to a power of two >= 16 rows and the head/hidden dims to
powers of two >= 16 columns (masked), as `tl.dot` needs; L = 1..3 memory layers with one hidden width.

On CPU tensors the kernels run under Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported):
slow, and how the tests check them against the token-loop reference. Not twice differentiable.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .cpu import _pack, _unpack, sum_target_grad

# Interpreting is decided when the kernels below are decorated, i.e. when this module is first imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Chunks per checkpoint segment of the backward (anchors recomputed from one stored state per segment).
SEGMENT = 8
MAX_LAYERS = 3
NUM_WARPS = 8

# Scratch slots of one program: per layer (3 slots each, for up to 3 layers) or single (after the per-layer ones).
_A = tl.constexpr(0)  # key-side activations a_l (a_0 = k)
_Z = tl.constexpr(1)  # key-side pre-activations z_l
_DL = tl.constexpr(2)  # inner-loss errors delta_l
_E = tl.constexpr(3)  # delta_{l+1} W_{l+1}^T (before GELU')
_H = tl.constexpr(4)  # query-side inputs h_l (h_0 = q)
_ZQ = tl.constexpr(5)  # query-side pre-activations
_HA = tl.constexpr(6)  # h_l a_l^T (b x b)
_X0 = tl.constexpr(7)  # Bc * dz (query-side backward)
_X1 = tl.constexpr(8)  # F * dz
_DZ = tl.constexpr(9)  # dz of the query side
_DDQ = tl.constexpr(10)  # d delta_l from the query side
_DAQ = tl.constexpr(11)  # d a_l from the query side
_DD = tl.constexpr(12)  # d delta_l (total)
_DA = tl.constexpr(13)  # d a_l (query side + state update)
_DE = tl.constexpr(14)  # d e_l
_DZX = tl.constexpr(15)  # d z_l through GELU' of the delta chain
_Y = tl.constexpr(48)  # LN output of the keys (single slots from here)
_G0 = tl.constexpr(49)  # 2 (M(k) - v)
_RSTD = tl.constexpr(50)  # LN 1/std per key
_CUR = tl.constexpr(51)  # running d z of the key-side chain backward
_DRES = tl.constexpr(52)  # d (residual k) of the inner loss
N_SLOTS = 53


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):
    """GELU'(z) = Phi(z) + z phi(z)."""
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def _gelu_grad2(z):
    """GELU''(z) = phi(z) (2 - z^2)."""
    return tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    return tl.dot(a, b, acc, input_precision=PREC, out_dtype=acc.dtype)


@triton.jit
def _ld(ptr, R: tl.constexpr, C: tl.constexpr):
    """A full (R, C) scratch block, row stride C."""
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    return tl.load(ptr + r[:, None] * C + c[None, :])


@triton.jit
def _st(ptr, x, R: tl.constexpr, C: tl.constexpr):
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    tl.store(ptr + r[:, None] * C + c[None, :], x)


@triton.jit
def _ld_tok(ptr, b, D, BB: tl.constexpr, DP: tl.constexpr):
    """A chunk's (b, D) token block (row stride D), zero-padded to (BB, DP)."""
    r = tl.arange(0, BB)
    c = tl.arange(0, DP)
    return tl.load(ptr + r[:, None] * D + c[None, :], mask=(r[:, None] < b) & (c[None, :] < D), other=0.0)


@triton.jit
def _st_tok(ptr, x, b, D, BB: tl.constexpr, DP: tl.constexpr):
    r = tl.arange(0, BB)
    c = tl.arange(0, DP)
    tl.store(ptr + r[:, None] * D + c[None, :], x, mask=(r[:, None] < b) & (c[None, :] < D))


@triton.jit
def _ld_vec(ptr, b, BB: tl.constexpr):
    r = tl.arange(0, BB)
    return tl.load(ptr + r, mask=r < b, other=0.0)


@triton.jit
def _x_w(x_ptr, w_ptr, IN: tl.constexpr, OUT: tl.constexpr, INP: tl.constexpr, OUTP: tl.constexpr,
         BB: tl.constexpr, KT: tl.constexpr, PREC: tl.constexpr):
    """(BB, INP) scratch block @ state matrix W (IN, OUT, row-major) -> (BB, OUTP), over KT rows of W at a time."""
    r = tl.arange(0, BB)
    kk = tl.arange(0, KT)
    co = tl.arange(0, OUTP)
    acc = tl.zeros([BB, OUTP], dtype=x_ptr.dtype.element_ty)
    for k0 in tl.range(0, INP, KT):
        x = tl.load(x_ptr + r[:, None] * INP + (k0 + kk)[None, :])
        w = tl.load(w_ptr + (k0 + kk)[:, None] * OUT + co[None, :],
                    mask=((k0 + kk)[:, None] < IN) & (co[None, :] < OUT), other=0.0)
        acc = _dot(x, w, acc, PREC)
    return acc


@triton.jit
def _x_wt(x_ptr, w_ptr, IN: tl.constexpr, OUT: tl.constexpr, INP: tl.constexpr, OUTP: tl.constexpr,
          BB: tl.constexpr, KT: tl.constexpr, PREC: tl.constexpr):
    """(BB, OUTP) scratch block @ W^T (W: IN x OUT, row-major) -> (BB, INP), over KT columns of W at a time."""
    r = tl.arange(0, BB)
    kk = tl.arange(0, KT)
    ci = tl.arange(0, INP)
    acc = tl.zeros([BB, INP], dtype=x_ptr.dtype.element_ty)
    for k0 in tl.range(0, OUTP, KT):
        x = tl.load(x_ptr + r[:, None] * OUTP + (k0 + kk)[None, :])
        wt = tl.load(w_ptr + ci[None, :] * OUT + (k0 + kk)[:, None],
                     mask=(ci[None, :] < IN) & ((k0 + kk)[:, None] < OUT), other=0.0)
        acc = _dot(x, wt, acc, PREC)
    return acc


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr):
    for i in tl.range(0, n, BLOCK):
        o = i + tl.arange(0, BLOCK)
        tl.store(dst + o, tl.load(src + o, mask=o < n), mask=o < n)


# ---- forward of one chunk ------------------------------------------------------------------------------------------
# Layer l of L: in = D if l == 0 else HID, out = D if l == L - 1 else HID (DP/HP: padded); its [W; S] block starts at
# 0, 2 D out_0, 2 D HID + 2 HID HID in the packed state.


@triton.jit
def _key_layer(st, scr, l: tl.constexpr, L: tl.constexpr, D: tl.constexpr, HID: tl.constexpr, DP: tl.constexpr,
               HP: tl.constexpr, BB: tl.constexpr, SL: tl.constexpr, KT: tl.constexpr, PREC: tl.constexpr):
    """z_l = a_l W_l, a_{l+1} = gelu(z_l) (keys at the anchor weights)."""
    IN: tl.constexpr = D if l == 0 else HID
    OUT: tl.constexpr = D if l == L - 1 else HID
    INP: tl.constexpr = DP if l == 0 else HP
    OUTP: tl.constexpr = DP if l == L - 1 else HP
    OFF: tl.constexpr = 0 if l == 0 else (2 * D * HID if l == 1 else 2 * D * HID + 2 * HID * HID)
    z = _x_w(scr + (_A * 3 + l) * SL, st + OFF, IN, OUT, INP, OUTP, BB, KT, PREC)
    _st(scr + (_Z * 3 + l) * SL, z, BB, OUTP)
    if l < L - 1:
        _st(scr + (_A * 3 + l + 1) * SL, _gelu(z), BB, OUTP)


@triton.jit
def _delta_layer(st, scr, l: tl.constexpr, L: tl.constexpr, D: tl.constexpr, HID: tl.constexpr, DP: tl.constexpr,
                 HP: tl.constexpr, BB: tl.constexpr, SL: tl.constexpr, KT: tl.constexpr, PREC: tl.constexpr):
    """e_l = delta_{l+1} W_{l+1}^T, delta_l = e_l * GELU'(z_l), for l < L - 1 (so out_l = HID)."""
    OUT1: tl.constexpr = D if l + 1 == L - 1 else HID
    OUT1P: tl.constexpr = DP if l + 1 == L - 1 else HP
    OFF1: tl.constexpr = 2 * D * HID if l + 1 == 1 else 2 * D * HID + 2 * HID * HID
    e = _x_wt(scr + (_DL * 3 + l + 1) * SL, st + OFF1, HID, OUT1, HP, OUT1P, BB, KT, PREC)
    _st(scr + (_E * 3 + l) * SL, e, BB, HP)
    _st(scr + (_DL * 3 + l) * SL, e * _gelu_grad(_ld(scr + (_Z * 3 + l) * SL, BB, HP)), BB, HP)


@triton.jit
def _query_layer(st, scr, g_ptr, out_ptr, bc, fr, b, l: tl.constexpr, L: tl.constexpr, D: tl.constexpr,
                 HID: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr, SL: tl.constexpr,
                 KT: tl.constexpr, PREC: tl.constexpr, WRITE_OUT: tl.constexpr, tgt, TGT: tl.constexpr):
    """Every query with its own weights: z = Bc * (h W) + F * (h S) [+ (1 - Bc) * (h target)] - (G * h a^T) delta."""
    IN: tl.constexpr = D if l == 0 else HID
    OUT: tl.constexpr = D if l == L - 1 else HID
    INP: tl.constexpr = DP if l == 0 else HP
    OUTP: tl.constexpr = DP if l == L - 1 else HP
    OFF: tl.constexpr = 0 if l == 0 else (2 * D * HID if l == 1 else 2 * D * HID + 2 * HID * HID)
    TOFF: tl.constexpr = 0 if l == 0 else (D * HID if l == 1 else D * HID + HID * HID)  # layer l in a target
    r = tl.arange(0, BB)
    h_ptr = scr + (_H * 3 + l) * SL
    hw = _x_w(h_ptr, st + OFF, IN, OUT, INP, OUTP, BB, KT, PREC)
    hs = _x_w(h_ptr, st + OFF + IN * OUT, IN, OUT, INP, OUTP, BB, KT, PREC)
    h = _ld(h_ptr, BB, INP)
    a = _ld(scr + (_A * 3 + l) * SL, BB, INP)
    ha = _dot(h, tl.trans(a), tl.zeros([BB, BB], dtype=h.dtype), PREC)  # (BB, BB)
    gl = tl.load(g_ptr + l * b * b + r[:, None] * b + r[None, :], mask=(r[:, None] < b) & (r[None, :] < b), other=0.0)
    z = bc[:, None] * hw + fr[:, None] * hs
    if TGT:
        z += (1.0 - bc)[:, None] * _x_w(h_ptr, tgt + TOFF, IN, OUT, INP, OUTP, BB, KT, PREC)
    z = z - _dot(ha * gl, _ld(scr + (_DL * 3 + l) * SL, BB, OUTP), tl.zeros([BB, OUTP], dtype=h.dtype), PREC)
    _st(scr + (_HA * 3 + l) * SL, ha, BB, BB)
    _st(scr + (_ZQ * 3 + l) * SL, z, BB, OUTP)
    if l < L - 1:
        _st(scr + (_H * 3 + l + 1) * SL, _gelu(z), BB, OUTP)
    elif WRITE_OUT:
        _st_tok(out_ptr, z, b, D, BB, DP)


@triton.jit
def _update_layer(st, nxt, scr, gs_ptr, bce, pe, fe, b, l: tl.constexpr, L: tl.constexpr, D: tl.constexpr,
                  HID: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr, SL: tl.constexpr,
                  KT: tl.constexpr, PREC: tl.constexpr, tgt, TGT: tl.constexpr):
    """Chunk-end state: W' = Bc_e W + F_e S [+ (1 - Bc_e) target] - a^T (G_end * delta), S' = P_e S - a^T (S_end *
    delta), KT rows at once."""
    IN: tl.constexpr = D if l == 0 else HID
    OUT: tl.constexpr = D if l == L - 1 else HID
    INP: tl.constexpr = DP if l == 0 else HP
    OUTP: tl.constexpr = DP if l == L - 1 else HP
    OFF: tl.constexpr = 0 if l == 0 else (2 * D * HID if l == 1 else 2 * D * HID + 2 * HID * HID)
    TOFF: tl.constexpr = 0 if l == 0 else (D * HID if l == 1 else D * HID + HID * HID)  # layer l in a target
    r = tl.arange(0, BB)
    kk = tl.arange(0, KT)
    co = tl.arange(0, OUTP)
    dlt = _ld(scr + (_DL * 3 + l) * SL, BB, OUTP)
    m_w = _ld_vec(gs_ptr + l * 2 * b, b, BB)[:, None] * dlt
    m_s = _ld_vec(gs_ptr + l * 2 * b + b, b, BB)[:, None] * dlt
    a_ptr = scr + (_A * 3 + l) * SL
    for r0 in tl.range(0, INP, KT):
        rows = r0 + kk
        at = tl.load(a_ptr + r[None, :] * INP + rows[:, None])  # (KT, BB) = a[:, rows]^T
        m = (rows[:, None] < IN) & (co[None, :] < OUT)
        idx = rows[:, None] * OUT + co[None, :]
        w = tl.load(st + OFF + idx, mask=m, other=0.0)
        s = tl.load(st + OFF + IN * OUT + idx, mask=m, other=0.0)
        base = bce * w + fe * s
        if TGT:
            base += (1.0 - bce) * tl.load(tgt + TOFF + rows[:, None] * OUT + co[None, :], mask=m, other=0.0)
        wn = _dot(-at, m_w, base, PREC)
        sn = _dot(-at, m_s, pe * s, PREC)
        tl.store(nxt + OFF + idx, wn, mask=m)
        tl.store(nxt + OFF + IN * OUT + idx, sn, mask=m)


@triton.jit
def _chunk_forward(q_ptr, k_ptr, v_ptr, bf_ptr, g_ptr, e3_ptr, gs_ptr, st, nxt, scr, out_ptr, b,
                   L: tl.constexpr, D: tl.constexpr, HID: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr,
                   BB: tl.constexpr, SL: tl.constexpr, KT: tl.constexpr, RES: tl.constexpr, LN: tl.constexpr,
                   QUERY: tl.constexpr, UPDATE: tl.constexpr, WRITE_OUT: tl.constexpr, PREC: tl.constexpr,
                   EPS: tl.constexpr, tgt, TGT: tl.constexpr):
    """One memory chunk from anchor state `st` (and the item's decay target `tgt` when TGT): key side (always), query side (QUERY; written to out_ptr when
    WRITE_OUT), chunk-end state into `nxt` (UPDATE). Intermediates stay in the scratch for the backward."""
    r = tl.arange(0, BB)
    cd = tl.arange(0, DP)
    kx = _ld_tok(k_ptr, b, D, BB, DP)
    _st(scr + (_A * 3) * SL, kx, BB, DP)
    tl.debug_barrier()
    for l in tl.static_range(L):
        _key_layer(st, scr, l, L, D, HID, DP, HP, BB, SL, KT, PREC)
        tl.debug_barrier()
    # inner-loss error at the output, through the LayerNorm (no affine) when present
    f = _ld(scr + (_Z * 3 + L - 1) * SL, BB, DP)
    vx = _ld_tok(v_ptr, b, D, BB, DP)
    col = cd[None, :] < D
    if LN:
        mu = tl.sum(f, 1) / D
        fc = tl.where(col, f - mu[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(fc * fc, 1) / D + EPS)
        y = fc * rstd[:, None]
        if RES:
            g0 = 2.0 * (y + kx - vx)
        else:
            g0 = 2.0 * (y - vx)
        m1 = tl.sum(g0, 1) / D
        m2 = tl.sum(g0 * y, 1) / D
        g = tl.where(col, rstd[:, None] * (g0 - m1[:, None] - y * m2[:, None]), 0.0)
        _st(scr + _Y * SL, y, BB, DP)
        _st(scr + _G0 * SL, g0, BB, DP)
        tl.store(scr + _RSTD * SL + r, rstd)
    else:
        if RES:
            g = 2.0 * (f + kx - vx)
        else:
            g = 2.0 * (f - vx)
    _st(scr + (_DL * 3 + L - 1) * SL, g, BB, DP)
    tl.debug_barrier()
    for i in tl.static_range(L - 1):
        _delta_layer(st, scr, L - 2 - i, L, D, HID, DP, HP, BB, SL, KT, PREC)
        tl.debug_barrier()
    if QUERY:
        _st(scr + (_H * 3) * SL, _ld_tok(q_ptr, b, D, BB, DP), BB, DP)
        tl.debug_barrier()
        bc = _ld_vec(bf_ptr, b, BB)
        fr = _ld_vec(bf_ptr + b, b, BB)
        for l in tl.static_range(L):
            _query_layer(st, scr, g_ptr, out_ptr, bc, fr, b, l, L, D, HID, DP, HP, BB, SL, KT, PREC, WRITE_OUT, tgt,
                         TGT)
            tl.debug_barrier()
    if UPDATE:
        bce = tl.load(e3_ptr)
        pe = tl.load(e3_ptr + 1)
        fe = tl.load(e3_ptr + 2)
        for l in tl.static_range(L):
            _update_layer(st, nxt, scr, gs_ptr, bce, pe, fe, b, l, L, D, HID, DP, HP, BB, SL, KT, PREC, tgt, TGT)


@triton.jit
def _forward_kernel(q, k, v, bf, g, e3, gs, state0, target, out, final, ckpt, stbuf, scratch, N, b, n_seg, SS, TS,
                    TROWS, SCR, K, L: tl.constexpr, D: tl.constexpr, HID: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr,
                    BB: tl.constexpr, SL: tl.constexpr, KT: tl.constexpr, RES: tl.constexpr,
                    LN: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr, TGT: tl.constexpr):
    """One program per (batch, head) item: its chunk loop, the state ping-ponging between two buffers."""
    bh = tl.program_id(0).to(tl.int64)
    st0 = stbuf + bh * 2 * SS
    scr = scratch + bh * SCR
    tgt = target + (bh % TROWS) * TS  # a target row per item, or one per head shared by the batch rows
    _copy(state0 + bh * SS, st0, SS, 1024)
    tl.debug_barrier()
    for n in range(N):
        cur = st0 + (n % 2) * SS
        nxt = st0 + ((n + 1) % 2) * SS
        if SAVE:
            if n % K == 0:
                _copy(cur, ckpt + (bh * n_seg + n // K) * SS, SS, 1024)
        c = bh * N + n
        _chunk_forward(q + c * b * D, k + c * b * D, v + c * b * D, bf + c * 2 * b, g + c * L * b * b, e3 + c * 3,
                       gs + c * L * 2 * b, cur, nxt, scr, out + c * b * D, b, L, D, HID, DP, HP, BB, SL, KT, RES, LN,
                       True, True, True, PREC, EPS, tgt, TGT)
        tl.debug_barrier()
    _copy(st0 + (N % 2) * SS, final + bh * SS, SS, 1024)


# ---- backward of one chunk -----------------------------------------------------------------------------------------


@triton.jit
def _query_layer_bwd(st, scr, g_ptr, dg_ptr, dq_ptr, bc, fr, dz, dbc, dfr, b, l: tl.constexpr, L: tl.constexpr,
                     D: tl.constexpr, HID: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr,
                     SL: tl.constexpr, KT: tl.constexpr, PREC: tl.constexpr, tgt, dtgt, TGT: tl.constexpr):
    """Backward of `_query_layer` given dz = d z_l: d h_l (returned as d z_{l-1}, or written to dq), dG, dBc, dF,
    and the query side's parts of d delta_l (DDQ), d a_l (DAQ), dW_l, dS_l (through X0, X1)."""
    IN: tl.constexpr = D if l == 0 else HID
    OUT: tl.constexpr = D if l == L - 1 else HID
    INP: tl.constexpr = DP if l == 0 else HP
    OUTP: tl.constexpr = DP if l == L - 1 else HP
    OFF: tl.constexpr = 0 if l == 0 else (2 * D * HID if l == 1 else 2 * D * HID + 2 * HID * HID)
    TOFF: tl.constexpr = 0 if l == 0 else (D * HID if l == 1 else D * HID + HID * HID)  # layer l in a target
    r = tl.arange(0, BB)
    _st(scr + (_X0 * 3 + l) * SL, bc[:, None] * dz, BB, OUTP)
    _st(scr + (_X1 * 3 + l) * SL, fr[:, None] * dz, BB, OUTP)
    _st(scr + (_DZ * 3 + l) * SL, dz, BB, OUTP)
    tl.debug_barrier()
    uw = _x_wt(scr + (_DZ * 3 + l) * SL, st + OFF, IN, OUT, INP, OUTP, BB, KT, PREC)  # dz W^T (BB, INP)
    us = _x_wt(scr + (_DZ * 3 + l) * SL, st + OFF + IN * OUT, IN, OUT, INP, OUTP, BB, KT, PREC)
    h = _ld(scr + (_H * 3 + l) * SL, BB, INP)
    dbc += tl.sum(h * uw, 1)
    dfr += tl.sum(h * us, 1)
    dh = bc[:, None] * uw + fr[:, None] * us
    if TGT:  # z += ((1 - Bc) * h) target: dh, dBc, and dtarget += ((1 - Bc) * h)^T dz, KT rows at a time
        ut = _x_wt(scr + (_DZ * 3 + l) * SL, tgt + TOFF, IN, OUT, INP, OUTP, BB, KT, PREC)
        dbc -= tl.sum(h * ut, 1)
        dh += (1.0 - bc)[:, None] * ut
        kk = tl.arange(0, KT)
        co = tl.arange(0, OUTP)
        h_ptr = scr + (_H * 3 + l) * SL
        for r0 in tl.range(0, INP, KT):
            rows = r0 + kk
            m = (rows[:, None] < IN) & (co[None, :] < OUT)
            idx = TOFF + rows[:, None] * OUT + co[None, :]
            ht = tl.load(h_ptr + r[None, :] * INP + rows[:, None]) * (1.0 - bc)[None, :]  # (KT, BB)
            tl.store(dtgt + idx, _dot(ht, dz, tl.load(dtgt + idx, mask=m, other=0.0), PREC), mask=m)
    dlt = _ld(scr + (_DL * 3 + l) * SL, BB, OUTP)
    dsc = -_dot(dz, tl.trans(dlt), tl.zeros([BB, BB], dtype=dz.dtype), PREC)  # d (G * h a^T)
    ha = _ld(scr + (_HA * 3 + l) * SL, BB, BB)
    bb = (r[:, None] < b) & (r[None, :] < b)
    gl = tl.load(g_ptr + l * b * b + r[:, None] * b + r[None, :], mask=bb, other=0.0)
    ddq = -_dot(tl.trans(ha * gl), dz, tl.zeros([BB, OUTP], dtype=dz.dtype), PREC)
    _st(scr + (_DDQ * 3 + l) * SL, ddq, BB, OUTP)
    tl.store(dg_ptr + l * b * b + r[:, None] * b + r[None, :], dsc * ha, mask=bb)
    dsc = dsc * gl  # d (h a^T)
    a = _ld(scr + (_A * 3 + l) * SL, BB, INP)
    dh = _dot(dsc, a, dh, PREC)
    _st(scr + (_DAQ * 3 + l) * SL, _dot(tl.trans(dsc), h, tl.zeros([BB, INP], dtype=dz.dtype), PREC), BB, INP)
    if l > 0:
        dz = dh * _gelu_grad(_ld(scr + (_ZQ * 3 + l - 1) * SL, BB, INP))
    else:
        _st_tok(dq_ptr, dh, b, D, BB, DP)
        dz = dh
    return dz, dbc, dfr


@triton.jit
def _update_layer_bwd(cin, scr, gs_ptr, dgs_ptr, b, l: tl.constexpr, L: tl.constexpr, D: tl.constexpr,
                      HID: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr, SL: tl.constexpr,
                      KT: tl.constexpr, PREC: tl.constexpr):
    """Backward of `_update_layer` given the carry [dW'; dS']: d delta_l (DD), d a_l (DA), dG_end, dS_end."""
    IN: tl.constexpr = D if l == 0 else HID
    OUT: tl.constexpr = D if l == L - 1 else HID
    INP: tl.constexpr = DP if l == 0 else HP
    OUTP: tl.constexpr = DP if l == L - 1 else HP
    OFF: tl.constexpr = 0 if l == 0 else (2 * D * HID if l == 1 else 2 * D * HID + 2 * HID * HID)
    r = tl.arange(0, BB)
    gend = _ld_vec(gs_ptr + l * 2 * b, b, BB)
    send = _ld_vec(gs_ptr + l * 2 * b + b, b, BB)
    a_ptr = scr + (_A * 3 + l) * SL
    # d delta = d delta_q - G_end * (a dW') - S_end * (a dS')
    aw = _x_w(a_ptr, cin + OFF, IN, OUT, INP, OUTP, BB, KT, PREC)
    as_ = _x_w(a_ptr, cin + OFF + IN * OUT, IN, OUT, INP, OUTP, BB, KT, PREC)
    dd = _ld(scr + (_DDQ * 3 + l) * SL, BB, OUTP) - gend[:, None] * aw - send[:, None] * as_
    _st(scr + (_DD * 3 + l) * SL, dd, BB, OUTP)
    # P = delta [dW'; dS']^T: d a = d a_q - G_end * P_W - S_end * P_S, dG_end_j = -a_j . P_W_j, dS_end_j = -a_j . P_S_j
    pw = _x_wt(scr + (_DL * 3 + l) * SL, cin + OFF, IN, OUT, INP, OUTP, BB, KT, PREC)
    ps = _x_wt(scr + (_DL * 3 + l) * SL, cin + OFF + IN * OUT, IN, OUT, INP, OUTP, BB, KT, PREC)
    a = _ld(a_ptr, BB, INP)
    tl.store(dgs_ptr + l * 2 * b + r, -tl.sum(a * pw, 1), mask=r < b)
    tl.store(dgs_ptr + l * 2 * b + b + r, -tl.sum(a * ps, 1), mask=r < b)
    da = _ld(scr + (_DAQ * 3 + l) * SL, BB, INP) - gend[:, None] * pw - send[:, None] * ps
    _st(scr + (_DA * 3 + l) * SL, da, BB, INP)


@triton.jit
def _delta_layer_bwd(st, scr, l: tl.constexpr, L: tl.constexpr, D: tl.constexpr, HID: tl.constexpr,
                     DP: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr, SL: tl.constexpr, KT: tl.constexpr,
                     PREC: tl.constexpr):
    """Backward of `_delta_layer` (l < L - 1): d e_l (DE), d z_l through GELU' (DZX), d delta_{l+1} += d e_l W_{l+1}."""
    OUT1: tl.constexpr = D if l + 1 == L - 1 else HID
    OUT1P: tl.constexpr = DP if l + 1 == L - 1 else HP
    OFF1: tl.constexpr = 2 * D * HID if l + 1 == 1 else 2 * D * HID + 2 * HID * HID
    dd = _ld(scr + (_DD * 3 + l) * SL, BB, HP)
    z = _ld(scr + (_Z * 3 + l) * SL, BB, HP)
    _st(scr + (_DE * 3 + l) * SL, dd * _gelu_grad(z), BB, HP)
    _st(scr + (_DZX * 3 + l) * SL, dd * _ld(scr + (_E * 3 + l) * SL, BB, HP) * _gelu_grad2(z), BB, HP)
    tl.debug_barrier()
    dd1 = _ld(scr + (_DD * 3 + l + 1) * SL, BB, OUT1P)
    dd1 += _x_w(scr + (_DE * 3 + l) * SL, st + OFF1, HID, OUT1, HP, OUT1P, BB, KT, PREC)
    tl.debug_barrier()
    _st(scr + (_DD * 3 + l + 1) * SL, dd1, BB, OUT1P)


@triton.jit
def _chain_layer_bwd(st, cin, cout, scr, dk_ptr, bce, pe, fe, eww, ess, esw, b, l: tl.constexpr, L: tl.constexpr,
                     D: tl.constexpr, HID: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr,
                     SL: tl.constexpr, KT: tl.constexpr, RES: tl.constexpr, PREC: tl.constexpr, tgt, dtgt,
                     TGT: tl.constexpr):
    """Layer l of the key-side chain backward (CUR = d z_l): the next carry's [dW_l; dS_l] (decayed carry plus the
    rank-b terms of the key side, the delta chain and the query side), the coefficient dot products, and
    d z_{l-1} into CUR (or dk)."""
    IN: tl.constexpr = D if l == 0 else HID
    OUT: tl.constexpr = D if l == L - 1 else HID
    INP: tl.constexpr = DP if l == 0 else HP
    OUTP: tl.constexpr = DP if l == L - 1 else HP
    OFF: tl.constexpr = 0 if l == 0 else (2 * D * HID if l == 1 else 2 * D * HID + 2 * HID * HID)
    TOFF: tl.constexpr = 0 if l == 0 else (D * HID if l == 1 else D * HID + HID * HID)  # layer l in a target
    r = tl.arange(0, BB)
    kk = tl.arange(0, KT)
    co = tl.arange(0, OUTP)
    cur = _ld(scr + _CUR * SL, BB, OUTP)
    x0 = _ld(scr + (_X0 * 3 + l) * SL, BB, OUTP)
    x1 = _ld(scr + (_X1 * 3 + l) * SL, BB, OUTP)
    dlt = _ld(scr + (_DL * 3 + l) * SL, BB, OUTP)
    a_ptr = scr + (_A * 3 + l) * SL
    h_ptr = scr + (_H * 3 + l) * SL
    de_ptr = scr + (_DE * 3 + l - 1) * SL  # only read when l > 0 (its row stride is out_{l-1} = INP)
    for r0 in tl.range(0, INP, KT):
        rows = r0 + kk
        m = (rows[:, None] < IN) & (co[None, :] < OUT)
        idx = rows[:, None] * OUT + co[None, :]
        w = tl.load(st + OFF + idx, mask=m, other=0.0)
        s = tl.load(st + OFF + IN * OUT + idx, mask=m, other=0.0)
        cw = tl.load(cin + OFF + idx, mask=m, other=0.0)
        cs = tl.load(cin + OFF + IN * OUT + idx, mask=m, other=0.0)
        eww += tl.sum(tl.sum(w * cw, 1), 0)
        ess += tl.sum(tl.sum(s * cs, 1), 0)
        esw += tl.sum(tl.sum(s * cw, 1), 0)
        if TGT:  # W' += (1 - Bc_e) target: dBc_e -= <target, dW'>, dtarget += (1 - Bc_e) dW'
            eww -= tl.sum(tl.sum(tl.load(tgt + TOFF + idx, mask=m, other=0.0) * cw, 1), 0)
            dt = tl.load(dtgt + TOFF + idx, mask=m, other=0.0)
            tl.store(dtgt + TOFF + idx, dt + (1.0 - bce) * cw, mask=m)
        at = tl.load(a_ptr + r[None, :] * INP + rows[:, None])  # (KT, BB)
        ht = tl.load(h_ptr + r[None, :] * INP + rows[:, None])
        nw = _dot(at, cur, bce * cw, PREC)
        nw = _dot(ht, x0, nw, PREC)
        if l > 0:
            nw = _dot(tl.load(de_ptr + r[None, :] * INP + rows[:, None]), dlt, nw, PREC)
        ns = _dot(ht, x1, pe * cs + fe * cw, PREC)
        tl.store(cout + OFF + idx, nw, mask=m)
        tl.store(cout + OFF + IN * OUT + idx, ns, mask=m)
    dx = _x_wt(scr + _CUR * SL, st + OFF, IN, OUT, INP, OUTP, BB, KT, PREC)  # d a_l from z_l = a_l W_l
    dx += _ld(scr + (_DA * 3 + l) * SL, BB, INP)
    if l > 0:  # a_l = gelu(z_{l-1}); the delta chain adds its own d z_{l-1}
        dz = _gelu_grad(_ld(scr + (_Z * 3 + l - 1) * SL, BB, INP)) * dx + _ld(scr + (_DZX * 3 + l - 1) * SL, BB, INP)
        tl.debug_barrier()
        _st(scr + _CUR * SL, dz, BB, INP)
        tl.debug_barrier()
    else:
        if RES:
            dx += _ld(scr + _DRES * SL, BB, DP)
        _st_tok(dk_ptr, dx, b, D, BB, DP)
    return eww, ess, esw


@triton.jit
def _chunk_backward(k_ptr, v_ptr, bf_ptr, g_ptr, e3_ptr, gs_ptr, st, cin, cout, scr, dout_ptr, dq_ptr, dk_ptr,
                    dv_ptr, dbf_ptr, dg_ptr, de3_ptr, dgs_ptr, b, L: tl.constexpr, D: tl.constexpr,
                    HID: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr, SL: tl.constexpr,
                    KT: tl.constexpr, RES: tl.constexpr, LN: tl.constexpr, PREC: tl.constexpr, tgt, dtgt,
                    TGT: tl.constexpr):
    """Backward of one chunk whose forward intermediates are in the scratch; carry cin = d[W'; S'] of its end state,
    cout = d[W; S] of its anchor; with TGT, d of the decay target accumulates into dtgt."""
    r = tl.arange(0, BB)
    cd = tl.arange(0, DP)
    col = cd[None, :] < D
    # query side, last layer first
    bc = _ld_vec(bf_ptr, b, BB)
    fr = _ld_vec(bf_ptr + b, b, BB)
    dz = _ld_tok(dout_ptr, b, D, BB, DP)
    dbc = tl.zeros([BB], dtype=dz.dtype)
    dfr = tl.zeros([BB], dtype=dz.dtype)
    for i in tl.static_range(L):
        dz, dbc, dfr = _query_layer_bwd(st, scr, g_ptr, dg_ptr, dq_ptr, bc, fr, dz, dbc, dfr, b, L - 1 - i, L, D, HID,
                                        DP, HP, BB, SL, KT, PREC, tgt, dtgt, TGT)
        tl.debug_barrier()
    tl.store(dbf_ptr + r, dbc, mask=r < b)
    tl.store(dbf_ptr + b + r, dfr, mask=r < b)
    # state update
    for l in tl.static_range(L):
        _update_layer_bwd(cin, scr, gs_ptr, dgs_ptr, b, l, L, D, HID, DP, HP, BB, SL, KT, PREC)
    tl.debug_barrier()
    # the delta chain (delta_l = (delta_{l+1} W_{l+1}^T) * GELU'(z_l)), first layer first
    for l in tl.static_range(L - 1):
        _delta_layer_bwd(st, scr, l, L, D, HID, DP, HP, BB, SL, KT, PREC)
        tl.debug_barrier()
    # through the inner loss and the LayerNorm backward: d f and d (residual k, v)
    dg = _ld(scr + (_DD * 3 + L - 1) * SL, BB, DP)
    if LN:
        y = _ld(scr + _Y * SL, BB, DP)
        g0 = _ld(scr + _G0 * SL, BB, DP)
        gg = _ld(scr + (_DL * 3 + L - 1) * SL, BB, DP)
        rstd = tl.load(scr + _RSTD * SL + r)[:, None]
        m1 = (tl.sum(dg, 1) / D)[:, None]
        m2 = (tl.sum(dg * y, 1) / D)[:, None]
        c = (tl.sum(g0 * y, 1) / D)[:, None]
        m6 = (tl.sum(dg * gg, 1) / D)[:, None]
        dg0 = tl.where(col, rstd * (dg - m1 - y * m2), 0.0)
        dy = 2.0 * dg0 - rstd * (c * dg + m2 * g0)
        m4 = (tl.sum(dy, 1) / D)[:, None]
        m5 = (tl.sum(dy * y, 1) / D)[:, None]
        df = tl.where(col, rstd * ((dy - m4 - y * m5) - m6 * y), 0.0)
        dres = 2.0 * dg0
    else:
        df = 2.0 * dg
        dres = df
    _st_tok(dv_ptr, -dres, b, D, BB, DP)
    _st(scr + _CUR * SL, df, BB, DP)
    _st(scr + _DRES * SL, dres, BB, DP)
    tl.debug_barrier()
    # the key-side chain (z_l = a_l W_l, a_{l+1} = gelu(z_l)), last layer first, and the next carry
    bce = tl.load(e3_ptr)
    pe = tl.load(e3_ptr + 1)
    fe = tl.load(e3_ptr + 2)
    eww = tl.sum(tl.zeros([BB], dtype=dz.dtype), 0)
    ess = eww
    esw = eww
    for i in tl.static_range(L):
        eww, ess, esw = _chain_layer_bwd(st, cin, cout, scr, dk_ptr, bce, pe, fe, eww, ess, esw, b, L - 1 - i, L, D,
                                         HID, DP, HP, BB, SL, KT, RES, PREC, tgt, dtgt, TGT)
        tl.debug_barrier()
    tl.store(de3_ptr, eww)
    tl.store(de3_ptr + 1, ess)
    tl.store(de3_ptr + 2, esw)


@triton.jit
def _backward_kernel(q, k, v, bf, g, e3, gs, target, ckpt, dout, dfinal, dq, dk, dv, dbf, dg, de3, dgs, dstate, dtarget,
                     segst, carry, scratch, N, b, n_seg, SS, TS, TROWS, SCR, K, L: tl.constexpr, D: tl.constexpr,
                     HID: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr, SL: tl.constexpr,
                     KT: tl.constexpr, RES: tl.constexpr, LN: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr,
                     TGT: tl.constexpr):
    """One program per item: segments in reverse; each recomputes its anchors from its checkpoint, then runs its
    chunks' backwards in reverse (the chunk's forward recomputed into the scratch first)."""
    bh = tl.program_id(0).to(tl.int64)
    seg = segst + bh * K * SS
    cb = carry + bh * 2 * SS
    scr = scratch + bh * SCR
    tgt = target + (bh % TROWS) * TS  # a target row per item, or one per head shared by the batch rows
    dtgt = dtarget + bh * TS  # per item, zeros on entry
    _copy(dfinal + bh * SS, cb, SS, 1024)  # chunk n's carry (d of its end state) sits at parity N - 1 - n
    tl.debug_barrier()
    for sg_i in range(n_seg):
        sg = n_seg - 1 - sg_i
        n0 = sg * K
        cnt = tl.minimum(N - n0, K)
        _copy(ckpt + (bh * n_seg + sg) * SS, seg, SS, 1024)
        tl.debug_barrier()
        for j in range(cnt - 1):  # anchors of the segment's chunks
            c = bh * N + n0 + j
            _chunk_forward(q + c * b * D, k + c * b * D, v + c * b * D, bf + c * 2 * b, g + c * L * b * b, e3 + c * 3,
                           gs + c * L * 2 * b, seg + j * SS, seg + (j + 1) * SS, scr, dout, b, L, D, HID, DP, HP, BB,
                           SL, KT, RES, LN, False, True, False, PREC, EPS, tgt, TGT)
            tl.debug_barrier()
        for jj in range(cnt):
            j = cnt - 1 - jj
            n = n0 + j
            c = bh * N + n
            st = seg + j * SS
            _chunk_forward(q + c * b * D, k + c * b * D, v + c * b * D, bf + c * 2 * b, g + c * L * b * b, e3 + c * 3,
                           gs + c * L * 2 * b, st, st, scr, dout, b, L, D, HID, DP, HP, BB, SL, KT, RES, LN, True,
                           False, False, PREC, EPS, tgt, TGT)
            tl.debug_barrier()
            _chunk_backward(k + c * b * D, v + c * b * D, bf + c * 2 * b, g + c * L * b * b, e3 + c * 3,
                            gs + c * L * 2 * b, st, cb + ((N - 1 - n) % 2) * SS, cb + ((N - n) % 2) * SS, scr,
                            dout + c * b * D, dq + c * b * D, dk + c * b * D, dv + c * b * D, dbf + c * 2 * b,
                            dg + c * L * b * b, de3 + c * 3, dgs + c * L * 2 * b, b, L, D, HID, DP, HP, BB, SL, KT,
                            RES, LN, PREC, tgt, dtgt, TGT)
            tl.debug_barrier()
    _copy(cb + (N % 2) * SS, dstate + bh * SS, SS, 1024)


# ---- the autograd.Function ------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# Largest memory chunk on a GPU: at 64 tokens the backward's (64 x 256) blocks need 240 KB of shared memory (compiled
# for sm_90), more than an H100/H200 block may use (227 KB); 32 needs 144 KB.
MAX_GPU_CHUNK = 32


def check_supported(q: torch.Tensor, dims, chunk: int) -> None:
    """ValueError naming what the Triton kernels cannot run: device, dtype, depth, hidden widths, chunk size."""
    if q.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"impl='triton' computes in float32/float64, got {q.dtype}")
    L = len(dims) - 1
    if L > MAX_LAYERS:
        raise ValueError(f"impl='triton' supports 1..{MAX_LAYERS} memory layers, got len(weights)={L}")
    if len(set(dims[1:-1])) > 1:
        raise ValueError(f"impl='triton' needs one hidden width for all memory layers, got widths {list(dims[1:-1])}")
    if q.device.type != "cuda" and not (INTERPRET and q.device.type == "cpu"):
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones), got {q.device}")
    if q.device.type == "cuda" and chunk > MAX_GPU_CHUNK:
        raise ValueError(f"impl='triton' runs memory chunks of up to {MAX_GPU_CHUNK} tokens on GPUs (shared memory), "
                         f"got chunk_size={chunk}")


def _meta(q: torch.Tensor, dims, residual: bool, layer_norm: bool, ln_eps: float) -> dict:
    BH, N, b, D = q.shape
    L = len(dims) - 1
    HID = dims[1] if L > 1 else D
    DP, HP, BB = _pow2(D), _pow2(HID), _pow2(b)
    tf32 = q.is_cuda and q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return dict(L=L, D=D, HID=HID, DP=DP, HP=HP, BB=BB, SL=BB * max(DP, HP, BB), KT=min(32, DP, HP),
                RES=bool(residual), LN=bool(layer_norm), PREC="tf32" if tf32 else "ieee", EPS=float(ln_eps))


class TritonChunkedMemory(torch.autograd.Function):
    """Inputs and outputs as `cpu.CpuChunkedMemory`: q, k, v (BH, N, b, D); BF (BH, N, 2, b); G (BH, N, L, b, b);
    E3 (BH, N, 3); GS (BH, N, L, 2, b); target (BH, sum_l in_l out_l) or empty (`cpu.pack_target`); state
    W_1..W_L, S_1..S_L (BH, in, out). Returns the queries' last-layer pre-norm outputs (BH, N, b, D) and the final
    W_1..W_L, S_1..S_L."""

    @staticmethod
    def forward(ctx, residual: bool, layer_norm: bool, ln_eps: float, q, k, v, BF, G, E3, GS, target, *state):
        BH, N, b, D = q.shape
        L = len(state) // 2
        dims = [D] + [w.shape[-1] for w in state[:L]]
        meta = _meta(q, dims, residual, layer_norm, ln_eps)
        flat = _pack(state[:L], state[L:])
        SS = flat.shape[1]
        K = min(SEGMENT, N)
        n_seg = -(-N // K)
        SCR = N_SLOTS * meta["SL"]
        save = any(ctx.needs_input_grad)
        out = torch.empty_like(q)
        final = torch.empty_like(flat)
        ckpt = q.new_empty((BH, n_seg, SS) if save else (1,))
        stbuf = q.new_empty((BH, 2, SS))
        scratch = q.new_zeros((BH, SCR))
        has_target = target.numel() > 0
        tgt = target if has_target else flat  # any tensor: not read without TGT
        _forward_kernel[(BH,)](q, k, v, BF, G, E3, GS, flat, tgt, out, final, ckpt, stbuf, scratch, N, b, n_seg, SS,
                               tgt.shape[1] if has_target else 0, tgt.shape[0] if has_target else 1, SCR, K, SAVE=save,
                               TGT=has_target,
                               num_warps=NUM_WARPS, **meta)
        ctx.meta, ctx.dims, ctx.K = meta, dims, K
        ctx.save_for_backward(q, k, v, BF, G, E3, GS, target, ckpt)
        W, S = _unpack(final, dims)
        return (out, *W, *S)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *dfinal):
        q, k, v, BF, G, E3, GS, target, ckpt = ctx.saved_tensors
        meta, dims, K = ctx.meta, ctx.dims, ctx.K
        BH, N, b, D = q.shape
        L = len(dims) - 1
        n_seg = -(-N // K)
        dout = torch.zeros_like(q) if dout is None else dout.contiguous()
        shapes = [(BH, dims[l], dims[l + 1]) for l in range(L)]
        dW = [d if d is not None else q.new_zeros(s) for d, s in zip(dfinal[:L], shapes)]
        dS = [d if d is not None else q.new_zeros(s) for d, s in zip(dfinal[L:], shapes)]
        dflat = _pack(dW, dS)
        SS = dflat.shape[1]
        SCR = N_SLOTS * meta["SL"]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dBF, dG, dE3, dGS = torch.empty_like(BF), torch.empty_like(G), torch.empty_like(E3), torch.empty_like(GS)
        dstate = torch.empty_like(dflat)
        segst = q.new_empty((BH, K, SS))  # the anchors of one segment
        carry = q.new_empty((BH, 2, SS))
        scratch = q.new_zeros((BH, SCR))
        has_target = target.numel() > 0
        tgt = target if has_target else dflat
        dtarget = q.new_zeros((BH, tgt.shape[1])) if has_target else dflat
        _backward_kernel[(BH,)](q, k, v, BF, G, E3, GS, tgt, ckpt, dout, dflat, dq, dk, dv, dBF, dG, dE3, dGS, dstate,
                                dtarget, segst, carry, scratch, N, b, n_seg, SS, tgt.shape[1] if has_target else 0,
                                tgt.shape[0] if has_target else 1, SCR, K, TGT=has_target, num_warps=NUM_WARPS, **meta)
        dW0, dS0 = _unpack(dstate, dims)
        return (None, None, None, dq, dk, dv, dBF, dG, dE3, dGS, sum_target_grad(dtarget, target) if has_target else None,
                *dW0, *dS0)
