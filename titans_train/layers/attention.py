"""Causal multi-head attention with RoPE, an optional sliding window and learned persistent tokens.

The module is used three ways:
- `forward(x, cache, pos)`: full causal or sliding-window attention over a stream, `cache` holding the keys and
  values a later token can still see (Transformer++, MAG, MAL);
- its pieces (`qkv`, `kv`, `persistent_kv`, `attend`) composed by MAC's segment attention in `models/blocks.py`.

Persistent memory (TITANS.md section 1): `n_persistent` learned tokens per layer, projected by this layer's
key/value maps and put in front of every query's context. Their keys get no rotary embedding: they have no
position, and like attention sinks they are equally reachable from every position.

Backends: sliding-window attention runs blockwise (`ops.sliding_window`: O(T x window) compute and memory,
SDPA on any device), or as flex attention (CUDA, compiled, skips fully masked blocks; `auto` uses it on CUDA for
at least `FLEX_MIN_QUERIES` queries). Full causal attention without prefix or cache uses SDPA's `is_causal`
(flash kernels); with a prefix or a cache, and MAC's segment attention (whose keys are bounded by the segment),
SDPA with the boolean mask of `ops.attention_masks`. All evaluate the same mask functions.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_train.layers.rope import apply_rope, rope_cos_sin
from titans_train.layers.state import KVCache
from titans_train.ops.attention_masks import MaskMod, materialize, sliding_window_mod
from titans_train.ops.sliding_window import sliding_window_attention

FLEX_MIN_QUERIES = 128
_BLOCK_MASKS: OrderedDict = OrderedDict()  # (mask key, q_len, kv_len, device) -> flex BlockMask, small LRU
_FLEX = None


def _flex_attention():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _use_flex(q: Tensor, backend: str, is_causal: bool) -> bool:
    return q.is_cuda and (backend == "flex" or (backend == "auto" and not is_causal and q.shape[2] >= FLEX_MIN_QUERIES))


def attention(q: Tensor, k: Tensor, v: Tensor, mask_mod: MaskMod, *, mask_key: tuple | None = None,
              is_causal: bool = False, backend: str = "auto") -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for q (B, H, Tq, D), k, v (B, H, Tk, D) -> (B, H, Tq, D).

    `mask_mod` decides visibility (see `ops.attention_masks`); `is_causal` says it is plain top-left causal with
    Tq == Tk (lets SDPA use its causal kernels). `mask_key` (hashable, describing `mask_mod`) lets flex cache
    its block mask; without it flex rebuilds the block mask each call.
    """
    tq, tk = q.shape[2], k.shape[2]
    if _use_flex(q, backend, is_causal):
        from torch.nn.attention.flex_attention import create_block_mask

        key = None if mask_key is None else (mask_key, tq, tk, q.device)
        block_mask = _BLOCK_MASKS.get(key) if key is not None else None
        if block_mask is None:
            block_mask = create_block_mask(mask_mod, None, None, tq, tk, device=q.device)
            if key is not None:
                _BLOCK_MASKS[key] = block_mask
                while len(_BLOCK_MASKS) > 32:
                    _BLOCK_MASKS.popitem(last=False)
        return _flex_attention()(q, k, v, block_mask=block_mask)
    if is_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = materialize(mask_mod, tq, tk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, *, window: int | None = None, n_persistent: int = 0,
                 rope_theta: float = 10000.0, backend: str = "auto"):
        super().__init__()
        assert dim % heads == 0, f"heads={heads} must divide dim={dim}"
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.window, self.n_persistent, self.rope_theta, self.backend = window, n_persistent, rope_theta, backend
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.persistent = nn.Parameter(torch.zeros(n_persistent, dim)) if n_persistent else None

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys (both rotated to `positions` (T,)) and values of x (B, T, dim), each (B, H, T, D)."""
        q, k, v = (self._heads(t) for t in self.wqkv(x).split(self.dim, dim=-1))
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def kv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (rotated to `positions`) and values only: for context tokens that ask nothing (MAC memory)."""
        k, v = (self._heads(t) for t in F.linear(x, self.wqkv.weight[self.dim:]).split(self.dim, dim=-1))
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype)
        return apply_rope(k, cos, sin), v

    def persistent_kv(self, batch: int) -> tuple[Tensor, Tensor] | None:
        """Keys and values of the persistent tokens, (B, H, n_persistent, D), no RoPE; None without them."""
        if self.persistent is None:
            return None
        k, v = F.linear(self.persistent, self.wqkv.weight[self.dim:]).split(self.dim, dim=-1)  # (P, dim) each
        k, v = (t.view(1, -1, self.heads, self.head_dim).transpose(1, 2) for t in (k, v))  # (1, H, P, D)
        return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask_mod: MaskMod, *, mask_key: tuple | None = None,
               is_causal: bool = False) -> Tensor:
        """Attention then output projection: q (B, H, Tq, D), k, v (B, H, Tk, D) -> (B, Tq, dim)."""
        return self._out(attention(q, k, v, mask_mod, mask_key=mask_key, is_causal=is_causal, backend=self.backend))

    def _out(self, y: Tensor) -> Tensor:
        B, H, T, D = y.shape
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, dim)

    def cache_len(self) -> int | None:
        """How many past tokens a later token can still see (None: all of them)."""
        return None if self.window is None else self.window - 1

    def init_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        empty = torch.zeros(batch, self.heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone())

    def forward(self, x: Tensor, cache: KVCache | None = None, pos: int = 0) -> tuple[Tensor, KVCache]:
        """x (B, T, dim) at positions pos..pos+T-1, `cache` the keys/values before it -> (B, T, dim), new cache."""
        B, T, _ = x.shape
        positions = torch.arange(pos, pos + T, device=x.device)
        q, k, v = self.qkv(x, positions)
        if cache is not None and len(cache):
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)  # (B, H, n + T, D)
        n_cached = k.shape[2] - T
        keep = self.cache_len()
        new_cache = KVCache(k, v) if keep is None else KVCache(k[:, :, k.shape[2] - min(keep, k.shape[2]):],
                                                                  v[:, :, v.shape[2] - min(keep, v.shape[2]):])
        prefix = self.persistent_kv(B)
        n_prefix = self.n_persistent
        plain_causal = n_prefix == 0 and n_cached == 0 and (self.window is None or self.window >= T)
        # Beyond 2 windows, blockwise: O(T x window). Up to 2 windows (short pieces, decoding) the dense mask below is
        # at most (2 window, P + 3 window), as small as the blocks, and one plain call.
        if self.window is not None and T > 2 * self.window and not _use_flex(q, self.backend, False):
            y = sliding_window_attention(q, k, v, self.window, prefix=prefix, q_start=pos, kv_start=pos - n_cached)
            return self._out(y), new_cache
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        mod = sliding_window_mod(self.window, n_prefix=n_prefix, q_start=pos, kv_start=pos - n_cached)
        # The mask depends only on the relative layout, so this key is the same for every training chunk.
        mask_key = ("window", self.window, n_prefix, n_cached)
        return self.attend(q, k, v, mod, mask_key=mask_key, is_causal=plain_causal), new_cache
