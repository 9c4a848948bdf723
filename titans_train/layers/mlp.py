"""SwiGLU feed-forward (Llama): w2(silu(w1 x) * w3 x)."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.fused import swiglu


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up projections, fused
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu(self.w13(x)))  # silu(gate) * up, one fused pass each way on CPU
