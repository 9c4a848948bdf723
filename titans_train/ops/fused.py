"""Fused elementwise CPU kernels (`fused_cpu.cpp`): the memory's causal conv + SiLU, its per-head q / k / v
normalisation and its gated read-out norm, and SwiGLU's gating.

Why kernels: at long T a training step's small elementwise passes over (T, C) activations cost as much as large
matmuls (BENCHMARKS.md, "Training-step breakdown"). As K shifted multiply-adds plus a SiLU, the conv is ~K + 1
passes over a (B, T, 3 x inner) tensor forward and ~3K + 2 backward (each tap's input gradient, its weight
gradient as a product and a sum, SiLU's backward); SwiGLU's silu(gate) * up is 2 forward and ~4 backward plus the
copy that joins the two halves' gradients; splitting q / k / v into heads and normalising them was ~10 passes and
copies (a transpose, F.normalize's norm, clamp and division, the RMS norm's square, mean, rsqrt and product, the
memory op's copy of the transposed views), 15% of a memory layer's training step at T = 8192, and the read-out's
per-head RMS norm, head merge and SiLU gate another ~12 passes. The kernels make one
pass each way (per block of channels for the
conv's backward). Elsewhere (CUDA, bf16, no compiler) the same math runs as PyTorch ops.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cpu_extension import Extension

_KERNEL = Extension("titans_fused_cpu", Path(__file__).with_name("fused_cpu.cpp"), "the fused elementwise CPU kernels")


def _kernel_applies(*tensors: Tensor) -> bool:
    x = tensors[0]
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
            and all(t.dtype == x.dtype for t in tensors) and _KERNEL.module() is not None)


def causal_conv_silu(seq: Tensor, weight: Tensor, since: Tensor | None = None) -> Tensor:
    """silu(y), y_t = sum_j weight[K - 1 - j] * seq[t + K - 1 - j] over the taps j = 0..K-1 (j tokens back).

    seq (B, T + K - 1, C): the K - 1 inputs before this call's first token, then its T tokens; weight (K, C), row
    K - 1 the current token's tap; since (B, T) integer, the tokens since each token's document start (a tap j
    counts only if since >= j), None where no document starts. Returns (B, T, C).
    """
    if _kernel_applies(seq, weight):
        since_t = seq.new_empty(0, dtype=torch.long) if since is None else since.to(torch.long).contiguous()
        return _CpuCausalConvSilu.apply(seq.contiguous(), weight.contiguous(), since_t)
    return causal_conv_silu_taps(seq, weight, since)


def causal_conv_silu_taps(seq: Tensor, weight: Tensor, since: Tensor | None = None) -> Tensor:
    """The same as K shifted multiply-adds in PyTorch (any device and dtype)."""
    K = weight.shape[0]
    T = seq.shape[1] - (K - 1)
    out = seq[:, K - 1:] * weight[K - 1]
    for j in range(1, K):  # tap j tokens back
        tap = seq[:, K - 1 - j : K - 1 - j + T]
        if since is not None:
            tap = tap * (since >= j)[..., None]
        out = torch.addcmul(out, tap, weight[K - 1 - j])
    return F.silu(out)


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for gate_up = [gate | up] on the last dim (2H -> H)."""
    if _kernel_applies(gate_up):
        return _CpuSwiGLU.apply(gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


NORM_MODES = {None: 0, "l2": 1, "rms": 2}


def head_norms(x: Tensor, heads: int, modes: tuple[str | None, ...]) -> tuple[Tensor, ...]:
    """Split x (B, T, P * heads * D) into its P parts, each into heads, and normalise each head's D features.

    modes: one per part, "l2" (F.normalize: x / max(|x|, 1e-12)), "rms" (x * rsqrt(mean(x^2) + 1e-6)) or None.
    Returns P tensors (B, heads, T, D); contiguous from the CPU kernel (the layout the memory op reads).
    """
    if _kernel_applies(x):
        return _CpuHeadNorms.apply(x.contiguous(), heads, tuple(NORM_MODES[m] for m in modes))
    return head_norms_torch(x, heads, modes)


def head_norms_torch(x: Tensor, heads: int, modes: tuple[str | None, ...]) -> tuple[Tensor, ...]:
    """The same as PyTorch ops (any device and dtype)."""
    B, T, C = x.shape
    out = []
    for part, mode in zip(x.chunk(len(modes), dim=-1), modes):
        y = part.view(B, T, heads, -1).transpose(1, 2)  # (B, H, T, D)
        if mode == "l2":
            y = F.normalize(y, dim=-1)
        elif mode == "rms":
            y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        out.append(y)
    return tuple(out)


def gated_head_norm(y: Tensor, weight: Tensor, gate: Tensor) -> Tensor:
    """Per-head RMS norm with a scale, heads merged, SiLU gate: y (B, H, T, D), weight (H, D), gate (B, T, H * D)
    -> (B, T, H * D) = y * rsqrt(mean(y^2) + 1e-6) * weight (as (B, T, H * D)) * silu(gate)."""
    if _kernel_applies(y, weight, gate):
        return _CpuGatedHeadNorm.apply(y.contiguous(), weight.contiguous(), gate.contiguous())
    return gated_head_norm_torch(y, weight, gate)


def gated_head_norm_torch(y: Tensor, weight: Tensor, gate: Tensor) -> Tensor:
    """The same as PyTorch ops (any device and dtype)."""
    y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * weight[:, None, :]
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D) * F.silu(gate)


def available() -> bool:
    """True when the CPU kernels are built (building them now if needed)."""
    return _KERNEL.module() is not None


class _CpuCausalConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seq, weight, since):
        out, pre = _KERNEL.module().conv_forward(seq, weight, since)
        ctx.save_for_backward(seq, weight, since, pre)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        seq, weight, since, pre = ctx.saved_tensors
        dseq, dweight = _KERNEL.module().conv_backward(grad.contiguous(), seq, weight, since, pre)
        return dseq, dweight, None


class _CpuSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _KERNEL.module().swiglu_forward(gate_up)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        return _KERNEL.module().swiglu_backward(grad.contiguous(), gate_up)


class _CpuHeadNorms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, heads, modes):
        *outs, scale, coef = _KERNEL.module().head_norms_forward(x, heads, list(modes))
        ctx.save_for_backward(*outs, scale, coef)
        ctx.set_materialize_grads(False)  # a part nobody differentiates (e.g. v without grad) costs no zeros
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        *outs, scale, coef = ctx.saved_tensors
        empty = outs[0].new_empty(0)
        grads = [empty if g is None else g.contiguous() for g in grads]
        return _KERNEL.module().head_norms_backward(grads, outs, scale, coef), None, None


class _CpuGatedHeadNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, gate):
        ctx.save_for_backward(y, weight, gate)
        return _KERNEL.module().gated_norm_forward(y, weight, gate)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, weight, gate = ctx.saved_tensors
        return tuple(_KERNEL.module().gated_norm_backward(grad.contiguous(), y, weight, gate))
