"""Sliding-window attention in O(T x window) compute and memory, on any device: query blocks against key bands.

A query at position p sees the keys at positions (p - window, p] (and the persistent prefix). For a block of `b`
consecutive queries those keys lie in one band of b + window - 1 consecutive keys; every block's band is a
strided view (`unfold`) of one padded key tensor, the prefix goes in front of each band, and a single SDPA call
over all blocks (the blocks are SDPA's head axis) takes a boolean mask of (n_blocks, b, P + band) entries. The
mask rule is `ops.attention_masks.sliding_window_mod`, the one the dense reference (`materialize` + SDPA over
all keys) uses, plus "the key exists" for the padding around the supplied keys. Nothing (T, T) is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from titans_train.ops.attention_masks import sliding_window_mod


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, *,
                             prefix: tuple[Tensor, Tensor] | None = None, q_start: int = 0, kv_start: int = 0,
                             block: int | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D) + sliding-window mask) v, blockwise.

    Args:
        q: (B, H, Tq, D), the queries at positions q_start .. q_start + Tq - 1.
        k, v: (B, H, Tk, D), the keys/values at positions kv_start .. kv_start + Tk - 1 (e.g. a cache of earlier
            tokens followed by the queries' own); keys outside the window of every query are never read.
        window: a query sees itself and the `window - 1` tokens before it.
        prefix: optional (k_p, v_p), (B, H, P, D): persistent tokens visible to every query.
        block: queries per block (default min(window, Tq)); any value gives the same result.
    Returns:
        (B, H, Tq, D), equal to SDPA with `materialize(sliding_window_mod(window, n_prefix=P, q_start=q_start,
        kv_start=kv_start), Tq, P + Tk)` over [prefix || k].
    """
    B, H, Tq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape != v.shape or k.shape[-1] != D:
        raise ValueError(f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)} do not match")
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    b = min(window, Tq) if block is None else block
    nb = -(-Tq // b)
    n_prev = -(-(window - 1) // b)  # earlier key blocks a query block needs
    band = (n_prev + 1) * b
    P = 0 if prefix is None else prefix[0].shape[2]
    # Padded key index m is the token at position p0 + m; block j's band is key blocks j .. j + n_prev.
    p0 = q_start - n_prev * b
    n_pad = (nb + n_prev) * b
    lo, hi = max(kv_start, p0), min(kv_start + k.shape[2], p0 + n_pad)  # the supplied keys that some query needs
    k, v = k[:, :, lo - kv_start:max(hi, lo) - kv_start], v[:, :, lo - kv_start:max(hi, lo) - kv_start]
    pad = (0, 0, lo - p0, n_pad - (lo - p0) - k.shape[2])

    def bands(x: Tensor, pre: Tensor | None) -> Tensor:
        """(B, H, nb, P + band, D): one copy, whose backward is slicing (cheaper than `unfold`'s)."""
        x = F.pad(x, pad)  # (B, H, (nb + n_prev) * b, D)
        parts = [x[:, :, None]] if nb == 1 else [x.view(B, H, nb + n_prev, b, D)[:, :, i:i + nb] for i in range(n_prev + 1)]
        if pre is not None:
            parts.insert(0, pre[:, :, None].expand(B, H, nb, P, D))
        return torch.cat(parts, dim=3)

    k_bands, v_bands = bands(k, None if prefix is None else prefix[0]), bands(v, None if prefix is None else prefix[1])

    # The mask, (nb, b, P + band): rows are queries j*b + r, columns the prefix then band keys at p0 + j*b + c.
    dev = q.device
    q_idx = (torch.arange(nb, device=dev)[:, None] * b + torch.arange(b, device=dev))[:, :, None]  # (nb, b, 1)
    k_pos = p0 + torch.arange(nb, device=dev)[:, None] * b + torch.arange(band, device=dev)  # (nb, band)
    kv_idx = torch.cat([torch.arange(P, device=dev).expand(nb, P), P + k_pos - kv_start], dim=1)[:, None]
    zero = torch.zeros((), dtype=torch.long, device=dev)
    mod = sliding_window_mod(window, n_prefix=P, q_start=q_start, kv_start=kv_start)
    exists = torch.cat([torch.ones(nb, P, dtype=torch.bool, device=dev), (k_pos >= lo) & (k_pos < hi)], dim=1)
    mask = (mod(zero, zero, q_idx, kv_idx) & exists[:, None]) | (q_idx >= Tq)  # padding rows see all: no NaN
    # 4-d (1, nb, b, P + band): CPU SDPA takes its flash kernel (no (b, P + band) scores kept) only for a 2-d/4-d mask.

    qb = F.pad(q, (0, 0, 0, nb * b - Tq)).reshape(B * H, nb, b, D)  # blocks on SDPA's head axis
    y = F.scaled_dot_product_attention(qb, k_bands.reshape(B * H, nb, P + band, D),
                                       v_bands.reshape(B * H, nb, P + band, D), attn_mask=mask[None])
    return y.reshape(B, H, nb * b, D)[:, :, :Tq]
