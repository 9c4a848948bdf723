"""The chunked dual form as a compiled CPU kernel (`cpu_kernel.cpp`), wrapped in an autograd.Function.

Why C++: at chunk 16 every matmul of the op is tiny (16 x 64 x 256), so the Python paths spend their time in
per-op dispatch and in reading and writing the (batch, head)-batched state between small kernels. The kernel runs
each (batch, head) item's whole chunk sequence on one thread, its state in that core's cache, with one direct
BLAS call per matmul; the backward is derived step by step in the kernel's comments. `triton_kernel.py` is the same
design for GPUs.

The kernel is built on first use with `torch.utils.cpp_extension.load` (a C++ compiler and ninja are needed; about
30 s, cached under ~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR). `available()` says whether it can be used;
when the build fails the op falls back to the Python paths and `build_error()` says why.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..cpu_extension import Extension

_KERNEL = Extension("titans_memory_cpu", Path(__file__).with_name("cpu_kernel.cpp"), "the memory op's CPU kernel")

# Chunks per checkpoint segment of the backward (anchors recomputed from one stored state per segment).
SEGMENT = 8


def _load():
    return _KERNEL.module()


def available() -> bool:
    """True when the CPU kernel is built (building it now if needed) and usable."""
    return _load() is not None


def build_error() -> str | None:
    """Why the kernel is unavailable (None when it is available or not tried yet)."""
    return _KERNEL.error


class CpuChunkedMemory(torch.autograd.Function):
    """Inputs ((batch * heads)-major, N chunks of b tokens): q, k, v (BH, N, b, D); BF (BH, N, 2, b) rows
    [Bc_i; F_i]; G (BH, N, L, b, b); E3 (BH, N, 3) chunk-end [Bc_e, P_e, F_e]; GS (BH, N, L, 2, b) chunk-end rows
    [G[b-1, j]; Deta[b-1, j] theta_j]; target: the weights the gate decays towards (BH, sum_l in_l out_l, per layer
    flattened; `pack_target`), or an empty tensor for zero; state W_1..W_L, S_1..S_L (BH, in, out). Returns the
    queries' last-layer pre-norm outputs (BH, N, b, D) and the final W_1..W_L, S_1..S_L. Not twice differentiable."""

    @staticmethod
    def forward(ctx, residual: bool, layer_norm: bool, ln_eps: float, q, k, v, BF, G, E3, GS, target, *state):
        mod = _load()
        L = len(state) // 2
        dims = [q.shape[-1]] + [w.shape[-1] for w in state[:L]]
        flat = _pack(state[:L], state[L:])
        save = any(ctx.needs_input_grad)
        out, final, ckpt = mod.forward(q, k, v, BF, G, E3, GS, flat, target, dims, SEGMENT, residual, layer_norm,
                                       ln_eps, save)
        ctx.residual, ctx.layer_norm, ctx.ln_eps = residual, layer_norm, ln_eps
        ctx.dims, ctx.segment = dims, SEGMENT  # ckpt layout
        ctx.save_for_backward(q, k, v, BF, G, E3, GS, target, ckpt)
        W, S = _unpack(final, dims)
        return (out, *W, *S)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *dfinal):
        q, k, v, BF, G, E3, GS, target, ckpt = ctx.saved_tensors
        dims = ctx.dims
        L = len(dims) - 1
        BH = q.shape[0]
        if dout is None:
            dout = torch.zeros_like(q)
        shapes = [(BH, dims[l], dims[l + 1]) for l in range(L)]
        dW = [d if d is not None else q.new_zeros(s) for d, s in zip(dfinal[:L], shapes)]
        dS = [d if d is not None else q.new_zeros(s) for d, s in zip(dfinal[L:], shapes)]
        dq, dk, dv, dBF, dG, dE3, dGS, dstate, dtarget = _load().backward(
            q, k, v, BF, G, E3, GS, target, ckpt, dout.contiguous(), _pack(dW, dS), dims, ctx.segment, ctx.residual,
            ctx.layer_norm, ctx.ln_eps,
        )
        dW0, dS0 = _unpack(dstate, dims)
        return (None, None, None, dq, dk, dv, dBF, dG, dE3, dGS, sum_target_grad(dtarget, target), *dW0, *dS0)


def pack_target(target, like: Tensor) -> Tensor:
    """The decay target W_1..W_L (R, in, out) -> (R, sum_l in out) for the kernels, R = BH or the heads alone (one
    target shared by every batch row: no per-row copy); None -> an empty tensor."""
    if target is None:
        return like.new_empty(0)
    return torch.cat([w.reshape(w.shape[0], -1) for w in target], dim=1).contiguous()


def sum_target_grad(dtarget: Tensor, target: Tensor) -> Tensor | None:
    """The kernels' per-item (BH, S) target gradient summed over the items that share a row of the (R, S) target."""
    if not target.numel():
        return None
    R = target.shape[0]
    return dtarget.view(-1, R, dtarget.shape[1]).sum(0) if dtarget.shape[0] != R else dtarget


def _pack(W, S) -> Tensor:
    """W_1..W_L, S_1..S_L (BH, in, out) -> one (BH, sum_l 2 in out) state, per layer [W_l; S_l]."""
    BH = W[0].shape[0]
    return torch.cat([torch.cat([w.reshape(BH, -1), s.reshape(BH, -1)], dim=1) for w, s in zip(W, S)], dim=1)


def _unpack(flat: Tensor, dims) -> tuple[list[Tensor], list[Tensor]]:
    BH = flat.shape[0]
    W, S, o = [], [], 0
    for i, j in zip(dims[:-1], dims[1:]):
        W.append(flat[:, o : o + i * j].reshape(BH, i, j))
        S.append(flat[:, o + i * j : o + 2 * i * j].reshape(BH, i, j))
        o += 2 * i * j
    return W, S
