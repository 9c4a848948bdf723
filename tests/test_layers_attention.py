"""Attention masks, RoPE, RMSNorm, SwiGLU and the attention layer (streaming with a cache == one call)."""

import pytest
import torch
import torch.nn.functional as F

from titans_train.layers.attention import Attention, attention
from titans_train.layers.mlp import SwiGLU
from titans_train.layers.norm import RMSNorm
from titans_train.layers.rope import apply_rope, rope_cos_sin
from titans_train.ops.attention_masks import mac_mod, materialize, sliding_window_mod

TOL = 1e-12  # float64


def test_causal_mask_is_lower_triangular():
    m = materialize(sliding_window_mod(None), 5, 5)
    assert torch.equal(m, torch.ones(5, 5, dtype=torch.bool).tril())


def test_sliding_window_with_persistent_prefix():
    # window 3, 2 persistent columns: row i sees both prefix columns and tokens i-2..i.
    m = materialize(sliding_window_mod(3, n_prefix=2), 6, 2 + 6)
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[:, :2] = True
    for i in range(6):
        for j in range(max(0, i - 2), i + 1):
            expected[i, 2 + j] = True
    assert torch.equal(m, expected)


def test_sliding_window_with_cache_offset_matches_full_rows():
    # 4 queries at positions 6..9 against keys at positions 3..9 (a cache of 3 then the 4 new ones) must equal
    # the corresponding block of the full mask.
    full = materialize(sliding_window_mod(4, n_prefix=1), 10, 11)
    part = materialize(sliding_window_mod(4, n_prefix=1, q_start=6, kv_start=3), 4, 1 + 7)
    assert torch.equal(part[:, :1], full[6:, :1])
    assert torch.equal(part[:, 1:], full[6:, 1 + 3:])


def test_mac_mask_memory_tokens_only_after_their_group():
    # stride 2: memory token m summarises segment tokens 2m, 2m+1 and is visible from token 2m+1 on.
    P, n_mem, n = 2, 3, 6
    m = materialize(mac_mod(n_prefix=P, n_mem=n_mem, stride=2), n, P + n_mem + n)
    for t in range(n):
        assert m[t, :P].all()
        for j in range(n_mem):
            assert bool(m[t, P + j]) == ((j + 1) * 2 - 1 <= t), (t, j)
        for j in range(n):
            assert bool(m[t, P + n_mem + j]) == (j <= t)
    # continuing a segment (q_start) gives the same rows
    part = materialize(mac_mod(n_prefix=P, n_mem=n_mem, stride=2, q_start=4), 2, P + n_mem + n)
    assert torch.equal(part, m[4:])


def test_rope_is_relative():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), 8, 10000.0, torch.float64)
        ck, sk = rope_cos_sin(torch.tensor([pk]), 8, 10000.0, torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert abs(score(5, 2) - score(105, 102)) < 1e-12
    assert abs(score(5, 2) - score(5, 3)) > 1e-6


def test_rmsnorm_and_swiglu():
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    n = RMSNorm(16).double()
    y = n(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(2, 3, dtype=torch.float64), atol=1e-5)
    mlp = SwiGLU(16, 24).double()
    g, u = F.linear(x, mlp.w13.weight).chunk(2, -1)
    assert torch.allclose(mlp(x), F.linear(F.silu(g) * u, mlp.w2.weight))


def naive_attention(q, k, v, mask):
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v


@pytest.mark.parametrize("window,n_persistent", [(None, 0), (None, 3), (5, 0), (5, 4), (1, 2)],
                         ids=lambda v: str(v))
def test_attention_streaming_equals_one_call(window, n_persistent):
    torch.manual_seed(0)
    layer = Attention(32, 4, window=window, n_persistent=n_persistent).double()
    torch.nn.init.normal_(layer.wqkv.weight, std=0.3)
    if layer.persistent is not None:
        torch.nn.init.normal_(layer.persistent)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    full, _ = layer(x)
    cache, pos, outs = None, 0, []
    for size in (1, 6, 2, 9, 5):
        y, cache = layer(x[:, pos:pos + size], cache, pos)
        outs.append(y)
        pos += size
        if window is not None:
            assert len(cache) <= window - 1
    assert (torch.cat(outs, 1) - full).abs().max() <= TOL


def test_attention_matches_naive_masked_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64) for _ in range(3))
    mod = sliding_window_mod(3)
    out = attention(q, k, v, mod)
    assert (out - naive_attention(q, k, v, materialize(mod, 7, 7))).abs().max() <= TOL
    causal = attention(q, k, v, sliding_window_mod(None), is_causal=True)
    assert (causal - naive_attention(q, k, v, materialize(sliding_window_mod(None), 7, 7))).abs().max() <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["window", "mac"])
def test_flex_equals_sdpa_on_gpu(kind):
    torch.manual_seed(0)
    B, H, D, T = 2, 4, 64, 384
    if kind == "window":
        mod, tk = sliding_window_mod(100, n_prefix=16), 16 + T
    else:
        mod, tk = mac_mod(n_prefix=16, n_mem=T // 2, stride=2), 16 + T // 2 + T
    q = torch.randn(B, H, T, D, device="cuda")
    k, v = torch.randn(B, H, tk, D, device="cuda"), torch.randn(B, H, tk, D, device="cuda")
    sdpa = attention(q, k, v, mod, backend="sdpa")
    flex = attention(q, k, v, mod, backend="flex", mask_key=("test", kind))
    assert (sdpa - flex).abs().max() < 2e-3
