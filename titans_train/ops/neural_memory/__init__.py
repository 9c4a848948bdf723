"""Neural long-term memory update (Titans): the public op, its fast path and its reference.

`memory_update` validates its inputs and runs the chunked dual form (`chunk.py`);
`memory_update_reference` is the token-loop specification (`naive.py`) with the same signature.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from .chunk import LN_EPS, memory_apply, memory_update_chunked
from .documents import memory_update_documents
from .naive import memory_update_reference

__all__ = ["memory_update", "memory_update_reference", "memory_apply", "debug_checks", "set_debug"]

# Value checks that need a device sync (rates outside [0, 1], non-finite inputs) only run in debug mode.
_DEBUG = os.environ.get("TITANS_DEBUG", "0") not in ("", "0", "false", "False")


def set_debug(enabled: bool) -> None:
    """Turn the op's value checks (rates in [0, 1], finite inputs) on or off for the whole process."""
    global _DEBUG
    _DEBUG = bool(enabled)


@contextlib.contextmanager
def debug_checks(enabled: bool = True):
    """Context manager form of `set_debug`, restoring the previous setting on exit."""
    global _DEBUG
    old, _DEBUG = _DEBUG, bool(enabled)
    try:
        yield
    finally:
        _DEBUG = old


def memory_update(
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
    reset: Tensor | None = None,
    mask: Tensor | None = None,
    initial: tuple[Tensor, ...] | None = None,
    forget_to: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Read and write a Titans neural memory over a sequence (chunked dual form, exact per token).

    The memory of each (batch, head) is an MLP with fast weights W = (W_1, ..., W_L):
    M_W(x) = x + LN(f_W(x)), f_W(x) = gelu(... gelu(x W_1) ...) W_L (exact GELU, no bias; LN without affine,
    eps `ln_eps`; `residual` / `layer_norm` switch the two parts off). For every token t, with anchor = the weights at
    the start of t's memory chunk (chunks of `chunk_size` tokens aligned to t = 0 of this call):

        u_t = grad_W ||M_anchor(k_t) - v_t||^2,  S_t = eta_t S_{t-1} - theta_t u_t,
        W_t = (1 - alpha_t) W_{t-1} + S_t,        y_t = M_{W_t}(q_t).

    Args:
        q, k, v: (B, H, T, D) queries, keys, values.
        theta: (B, H, T) inner learning rate in [0, 1] (already scaled), or (B, H, T, L) for one rate per
            memory layer.
        eta: (B, H, T) momentum decay in [0, 1].
        alpha: (B, H, T) forgetting gate in [0, 1], or (B, H, T, D) for a channel-wise gate: row r of the first
            memory layer's weights (input channel r, the key/query feature r, like GLA's gate on the key dimension)
            decays with alpha_t[r], W1_t = diag(1 - alpha_t) W1_{t-1} + S1_t, and every later layer with the
            channel mean alpha_t.mean(-1) (equal channels give exactly the (B, H, T) form). Momentum and theta are
            unchanged. Channel-wise alpha runs the autograd step ("auto" picks it; "cpu" and "triton" raise ValueError).
        weights: L tensors, layer i (B, H, in_i, out_i) with in_1 = out_L = D and out_i = in_{i+1}.
        momentum: L tensors shaped like `weights` (S_0; zeros at the start of a stream).
        chunk_size: tokens per memory chunk (one anchor per chunk). T need not be a multiple of it.
        compile: run the per-chunk step through `torch.compile` (fuses its elementwise work; compiled once per
            process and shape, which takes tens of seconds on CPU). Same results up to float rounding.
        impl: "cpu" (a C++ kernel built on first use, `ops/neural_memory/cpu_kernel.cpp`: each (batch, head)
            item's chunk loop on one core with direct BLAS calls, a hand-written backward that recomputes anchors
            from per-segment checkpoints, so little memory; float32/float64 CPU tensors, scalar alpha), "triton"
            (the same design as Triton kernels, `ops/neural_memory/triton_kernel.py`: one GPU program per (batch,
            head) item; CUDA tensors, or CPU ones under TRITON_INTERPRET=1; scalar alpha, L <= 3, one hidden width;
            TF32 matmuls where torch allows them), "autograd" (the per-chunk step under autograd; the path
            `compile=True` compiles, and the one for channel-wise alpha), or "auto" ("cpu" on CPU and "triton" on
            CUDA where they apply, unless compile=True; else "autograd"). All give the same results up to float
            rounding. "cpu" and "triton" are not twice differentiable.
        reset: (B, T) bool, True at the first token of a document packed into the row: the state before that token
            is (`initial`, zero momentum) and a memory chunk starts at it, so each document gives exactly what it
            gives alone from the initial state (`documents.py`). Needs `initial`.
        mask: (B, T) bool, False for absent tokens (padding): they neither read nor write the memory (output 0)
            and the memory chunks are counted over the present tokens only.
        initial: L tensors shaped like `weights` (the learned W_0 of each row); gradients reach them from every
            reset.
        forget_to: L tensors shaped like `weights`, or with batch size 1 (one target for every row, e.g. the learned
            W_0: nothing is copied per row), or None (the paper's form: the gate decays towards zero). The
            gate decays towards them instead: W_t = (1 - alpha_t) W_{t-1} + alpha_t forget_to + S_t, so that a
            long stream forgets back to them (e.g. the learned W_0) rather than to the all-zero MLP, from which the
            inner gradient of a bias-free MLP cannot grow it again. Every implementation; gradients reach them.

    Returns:
        y: (B, H, T, D), retrieval of each token after its own update, in q's dtype.
        weights_out, momentum_out: the state after the last token (fp32 under reduced precision).

    Gradients flow to every input, including the rates and the initial state. Under autocast, or with fp16/bf16
    inputs, all of the memory math runs in fp32.

    Example:
        >>> B, H, T, D = 1, 2, 10, 8
        >>> q = k = v = torch.randn(B, H, T, D)
        >>> r = torch.full((B, H, T), 0.1)
        >>> W = (torch.randn(B, H, D, 4 * D) * 0.1, torch.randn(B, H, 4 * D, D) * 0.1)
        >>> y, W1, S1 = memory_update(q, k, v, r, r, r, W, tuple(map(torch.zeros_like, W)), chunk_size=4)
        >>> y.shape
        torch.Size([1, 2, 10, 8])
    """
    _validate(q, k, v, theta, eta, alpha, weights, momentum, chunk_size)
    _validate_documents(q, weights, reset, mask, initial)
    if forget_to is not None and (len(forget_to) != len(weights) or any(
            tuple(f.shape[1:]) != tuple(w.shape[1:]) or f.shape[0] not in (1, w.shape[0])
            for f, w in zip(forget_to, weights))):
        raise ValueError(f"forget_to shapes {[tuple(w.shape) for w in forget_to]} must match the weights' "
                         f"{[tuple(w.shape) for w in weights]} (or have batch size 1)")
    if _DEBUG:
        _check_values(q, k, v, theta, eta, alpha, weights, momentum)
    out_dtype = q.dtype
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if theta.dim() == 3:
        theta = theta.unsqueeze(-1).expand(*theta.shape, len(weights))
    cast = lambda x: x.to(compute)  # noqa: E731
    kw = dict(chunk_size=chunk_size, residual=residual, layer_norm=layer_norm, ln_eps=ln_eps, compile=compile, impl=impl)
    with torch.autocast(device_type=q.device.type, enabled=False):
        if forget_to is not None:
            kw["forget_to"] = tuple(map(cast, forget_to))
        args = (*map(cast, (q, k, v, theta, eta, alpha)), tuple(map(cast, weights)), tuple(map(cast, momentum)))
        if reset is None and mask is None:
            y, w_out, s_out = memory_update_chunked(*args, **kw)
        else:
            if reset is None:
                reset = torch.zeros_like(mask)
            initial = tuple(map(cast, initial)) if initial is not None else args[6]
            y, w_out, s_out = memory_update_documents(*args, initial, reset, mask, **kw)
    return y.to(out_dtype), w_out, s_out


def _validate_documents(q, weights, reset, mask, initial) -> None:
    B, _, T, _ = q.shape
    for name, x in (("reset", reset), ("mask", mask)):
        if x is not None and (not isinstance(x, Tensor) or x.dtype != torch.bool or x.shape != (B, T)):
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a (B, T)={(B, T)} bool tensor, got {got}")
        if x is not None and x.device != q.device:
            raise ValueError(f"{name}.device={x.device} must equal q.device={q.device}")
    if reset is not None and initial is None:
        raise ValueError("reset needs initial (the weights a document starts from)")
    if initial is not None:
        if not isinstance(initial, (tuple, list)) or len(initial) != len(weights):
            raise ValueError(f"initial must be a tuple of len(weights)={len(weights)} tensors")
        for i, (w0, w) in enumerate(zip(initial, weights)):
            if not isinstance(w0, Tensor) or w0.shape != w.shape:
                got = tuple(w0.shape) if isinstance(w0, Tensor) else type(w0).__name__
                raise ValueError(f"initial[{i}].shape={got} must equal weights[{i}].shape={tuple(w.shape)}")


def _validate(q, k, v, theta, eta, alpha, weights, momentum, chunk_size) -> None:
    named = {"q": q, "k": k, "v": v, "theta": theta, "eta": eta, "alpha": alpha}
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name in ("q", "k", "v"):
        if named[name].dim() != 4:
            raise ValueError(f"{name} must be (B, H, T, D), got {name}.shape={tuple(named[name].shape)}")
    for name in ("k", "v"):
        if named[name].shape != q.shape:
            raise ValueError(f"{name}.shape={tuple(named[name].shape)} must equal q.shape={tuple(q.shape)}")
    B, H, T, D = q.shape
    if T == 0:
        raise ValueError("q.shape[2] (sequence length) must be >= 1, got 0")
    if not isinstance(weights, (tuple, list)) or not isinstance(momentum, (tuple, list)):
        raise ValueError("weights and momentum must be tuples of tensors, one per memory layer")
    L = len(weights)
    if L == 0:
        raise ValueError("weights must hold at least one memory layer, got 0")
    if len(momentum) != L:
        raise ValueError(f"len(momentum)={len(momentum)} must equal len(weights)={L}")
    if eta.shape != (B, H, T):
        raise ValueError(f"eta.shape={tuple(eta.shape)} must be (B, H, T)={(B, H, T)}")
    if alpha.shape != (B, H, T) and alpha.shape != (B, H, T, D):
        raise ValueError(f"alpha.shape={tuple(alpha.shape)} must be (B, H, T)={(B, H, T)} or, channel-wise, "
                         f"(B, H, T, D)={(B, H, T, D)}")
    if theta.shape != (B, H, T) and theta.shape != (B, H, T, L):
        raise ValueError(f"theta.shape={tuple(theta.shape)} must be (B, H, T)={(B, H, T)} or (B, H, T, L)={(B, H, T, L)}")
    prev_out = D
    for i, (w, s) in enumerate(zip(weights, momentum)):
        if not isinstance(w, Tensor) or not isinstance(s, Tensor):
            raise ValueError(f"weights[{i}] and momentum[{i}] must be tensors")
        if w.dim() != 4 or w.shape[:2] != (B, H):
            raise ValueError(f"weights[{i}].shape={tuple(w.shape)} must be (B, H, in, out) with (B, H)={(B, H)}")
        if w.shape[2] != prev_out:
            what = "q.shape[3] (D)" if i == 0 else f"weights[{i - 1}].shape[3]"
            raise ValueError(f"weights[{i}].shape[2]={w.shape[2]} must equal {what}={prev_out}")
        if s.shape != w.shape:
            raise ValueError(f"momentum[{i}].shape={tuple(s.shape)} must equal weights[{i}].shape={tuple(w.shape)}")
        prev_out = w.shape[3]
    if prev_out != D:
        raise ValueError(f"weights[{L - 1}].shape[3]={prev_out} must equal q.shape[3] (D)={D}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    tensors = {**named, **{f"weights[{i}]": w for i, w in enumerate(weights)},
               **{f"momentum[{i}]": s for i, s in enumerate(momentum)}}
    for name, x in tensors.items():
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {name}.dtype={x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}.device={x.device} must equal q.device={q.device}")
    for name in ("k", "v"):
        if named[name].dtype != q.dtype:
            raise ValueError(f"{name}.dtype={named[name].dtype} must equal q.dtype={q.dtype}")


def _check_values(q, k, v, theta, eta, alpha, weights, momentum) -> None:
    for name, x in {"theta": theta, "eta": eta, "alpha": alpha}.items():
        lo, hi = x.min().item(), x.max().item()
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    tensors = {"q": q, "k": k, "v": v, **{f"weights[{i}]": w for i, w in enumerate(weights)},
               **{f"momentum[{i}]": s for i, s in enumerate(momentum)}}
    for name, x in tensors.items():
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} holds non-finite values (NaN or inf)")
