"""Rotary position embedding (RoPE), computed from positions on the fly.

No cached table: angles come from the positions of each call, so a stream can run past the training length
and a model built on the meta device has no buffers to materialise. Angles are computed in fp32 (float64 when
the input is float64, for the exactness tests).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, head_dim // 2) for integer `positions` (T,)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim)
    angles = positions.to(work)[:, None] * inv_freq[None, :]  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of the last dim of x (B, H, T, D) by the angles (T, D/2) (Llama's rotate-half)."""
    x1, x2 = x.float().chunk(2, dim=-1) if x.dtype in (torch.float16, torch.bfloat16) else x.chunk(2, dim=-1)
    cos, sin = cos.to(x1.dtype), sin.to(x1.dtype)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)
