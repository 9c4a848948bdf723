"""Fused elementwise CPU kernels (`fused_cpu.cpp`): the memory's causal conv + SiLU, and SwiGLU's gating.

Why kernels: at long T a training step's small elementwise passes over (T, C) activations cost as much as large
matmuls (BENCHMARKS.md, "Training-step breakdown"). As K shifted multiply-adds plus a SiLU, the conv is ~K + 1
passes over a (B, T, 3 x inner) tensor forward and ~3K + 2 backward (each tap's input gradient, its weight
gradient as a product and a sum, SiLU's backward); SwiGLU's silu(gate) * up is 2 forward and ~4 backward plus the
copy that joins the two halves' gradients. The kernels make one pass each way (per block of channels for the
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
