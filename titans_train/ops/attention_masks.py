"""Attention masks as pure `mask_mod(b, h, q_idx, kv_idx) -> bool` functions.

One definition serves both backends: `materialize` evaluates a mask_mod on index grids into the boolean mask that
`scaled_dot_product_attention` takes (True = may attend), and flex attention takes the same function for its block
mask. Indices are into the query rows and key columns of one attention call; the closures map them to token
positions, so a call that continues a stream (a cache of earlier keys in front) uses the same rule as one call.

Key layouts:
- `sliding_window_mod`: [persistent (n_prefix) || tokens at positions kv_start, kv_start+1, ...]
- `mac_mod`:            [persistent (n_prefix) || memory tokens (n_mem) || segment tokens 0, 1, ...]
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def sliding_window_mod(window: int | None, *, n_prefix: int = 0, q_start: int = 0, kv_start: int = 0) -> MaskMod:
    """Causal (window None) or sliding-window attention with an always-visible prefix.

    Query row i is the token at position `q_start + i`; key column `n_prefix + j` the token at `kv_start + j`;
    columns `[0, n_prefix)` are persistent tokens, visible to every query. A token sees the tokens at positions
    p with `q - window < p <= q` (itself and `window - 1` before it).
    """

    def mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + q_start
        k_pos = kv_idx - n_prefix + kv_start
        visible = k_pos <= q_pos
        if window is not None:
            visible = visible & (q_pos - k_pos < window)
        return (visible & (kv_idx >= n_prefix)) | (kv_idx < n_prefix)

    return mod


def mac_mod(*, n_prefix: int, n_mem: int, stride: int, q_start: int = 0) -> MaskMod:
    """MAC's [persistent || memory tokens || segment] attention inside one segment.

    Query row i is segment token `q_start + i` (index within the segment). Memory token m summarises the
    retrieved h of segment tokens [m*stride, (m+1)*stride), which are computed from those tokens' own queries;
    it is visible to segment token t only when (m+1)*stride - 1 <= t, so no token sees a summary of its future.
    Segment token j is visible to t when j <= t. Persistent tokens are always visible.
    """

    def mod(b, h, q_idx, kv_idx):
        t = q_idx + q_start
        is_mem = (kv_idx >= n_prefix) & (kv_idx < n_prefix + n_mem)
        m = kv_idx - n_prefix
        mem_visible = is_mem & ((m + 1) * stride - 1 <= t)
        j = kv_idx - n_prefix - n_mem
        seg_visible = (kv_idx >= n_prefix + n_mem) & (j <= t)
        return (kv_idx < n_prefix) | mem_visible | seg_visible

    return mod


def materialize(mask_mod: MaskMod, q_len: int, kv_len: int, device: torch.device | str | None = None) -> Tensor:
    """The boolean (q_len, kv_len) mask of `mask_mod` (True = may attend), for `scaled_dot_product_attention`."""
    q_idx = torch.arange(q_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mask_mod(zero, zero, q_idx, kv_idx)
