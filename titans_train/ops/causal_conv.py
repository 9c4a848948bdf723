"""The neural memory's short causal depthwise conv over q, k, v, with the SiLU after it, as one CPU kernel.

Why a kernel: as K shifted multiply-adds plus a SiLU, the conv is ~K + 1 passes over a (B, T, 3 x inner) tensor
forward and ~3K + 2 backward (each tap's input gradient, its weight gradient as a product and a sum, SiLU's
backward); at long T these small elementwise passes were a tenth of an LMM training step (BENCHMARKS.md,
"Training-step breakdown"). `causal_conv_cpu.cpp` does the forward in one pass and the backward in one pass per
block of channels. Elsewhere (CUDA, bf16, no compiler) the same taps run in PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cpu_extension import Extension

_KERNEL = Extension("titans_causal_conv_cpu", Path(__file__).with_name("causal_conv_cpu.cpp"),
                    "the memory's causal conv CPU kernel")


def causal_conv_silu(seq: Tensor, weight: Tensor, since: Tensor | None = None) -> Tensor:
    """silu(y), y_t = sum_j weight[K - 1 - j] * seq[t + K - 1 - j] over the taps j = 0..K-1 (j tokens back).

    seq (B, T + K - 1, C): the K - 1 inputs before this call's first token, then its T tokens; weight (K, C), row
    K - 1 the current token's tap; since (B, T) integer, the tokens since each token's document start (a tap j
    counts only if since >= j), None where no document starts. Returns (B, T, C).
    """
    if seq.device.type == "cpu" and seq.dtype in (torch.float32, torch.float64) and weight.dtype == seq.dtype \
            and _KERNEL.module() is not None:
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


def available() -> bool:
    """True when the CPU kernel is built (building it now if needed)."""
    return _KERNEL.module() is not None


class _CpuCausalConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seq, weight, since):
        out, pre = _KERNEL.module().forward(seq, weight, since)
        ctx.save_for_backward(seq, weight, since, pre)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        seq, weight, since, pre = ctx.saved_tensors
        dseq, dweight = _KERNEL.module().backward(grad.contiguous(), seq, weight, since, pre)
        return dseq, dweight, None
