"""Rotary position embedding (RoPE), computed from positions on the fly.

No cached table: angles come from the positions of each call, so a stream can run past the training length
and a model built on the meta device has no buffers to materialise. Angles are computed in float64 and cast
afterwards: in fp32 the product position * frequency carries an absolute error of ~position * 6e-8 rad (0.1 rad at
position 2M, a visible phase error for the streams this framework runs to millions of tokens); the (T, D/2) float64
work is negligible next to the attention it feeds.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, head_dim // 2) for integer `positions` (T,)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    exact = torch.float32 if positions.device.type == "mps" else torch.float64  # MPS has no float64
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=exact) / head_dim)
    angles = positions.to(exact)[:, None] * inv_freq[None, :]  # (T, D/2)
    return angles.cos().to(work), angles.sin().to(work)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of the last dim of x (B, H, T, D) by the angles (T, D/2) (Llama's rotate-half)."""
    x1, x2 = x.float().chunk(2, dim=-1) if x.dtype in (torch.float16, torch.bfloat16) else x.chunk(2, dim=-1)
    cos, sin = cos.to(x1.dtype), sin.to(x1.dtype)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)
