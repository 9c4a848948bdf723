"""Attention masks, RoPE, RMSNorm, SwiGLU, blockwise sliding-window attention against the dense masked reference,
and the attention layer (streaming with a cache == one call == the dense reference; no (T, T) mask built)."""

import pytest
import torch
import torch.nn.functional as F

import titans_train.layers.attention as attention_module
from titans_train.config import ModelConfig
from titans_train.layers.attention import Attention, attention
from titans_train.models import build_model
from titans_train.layers.mlp import SwiGLU
from titans_train.layers.norm import RMSNorm
from titans_train.layers.rope import apply_rope, rope_cos_sin
from titans_train.ops.attention_masks import mac_mod, materialize, sliding_window_mod
from titans_train.ops.sliding_window import sliding_window_attention

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


def test_rope_angles_stay_exact_at_millions_of_tokens():
    """fp32 cos/sin at position ~2M equal the float64 ones to fp32 rounding (fp32 angles were ~0.1 rad off)."""
    import math

    pos = torch.tensor([2_097_151, 3_000_017, 7])
    cos32, sin32 = rope_cos_sin(pos, 64, 10000.0, torch.float32)
    assert cos32.dtype == torch.float32
    inv = [10000.0 ** (-i / 64) for i in range(0, 64, 2)]
    ref_cos = torch.tensor([[math.cos(p * f) for f in inv] for p in pos.tolist()])
    ref_sin = torch.tensor([[math.sin(p * f) for f in inv] for p in pos.tolist()])
    assert (cos32.double() - ref_cos.double()).abs().max() < 1e-6
    assert (sin32.double() - ref_sin.double()).abs().max() < 1e-6


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


def dense_window_reference(q, k, v, window, prefix, q_start, kv_start):
    """SDPA over [prefix || k] with the materialised (Tq, P + Tk) mask: the specification of the blockwise op."""
    P = 0 if prefix is None else prefix[0].shape[2]
    if prefix is not None:
        k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
    mask = materialize(sliding_window_mod(window, n_prefix=P, q_start=q_start, kv_start=kv_start), q.shape[2], k.shape[2])
    return naive_attention(q, k, v, mask)


# (T queries, window, persistent P, cached keys before the queries, block): T a multiple of the window or not,
# T < window, window 1, a cache shorter than / equal to / longer than window - 1 (keys no query sees), keys
# starting at the stream's start, blocks smaller than the window and not dividing it.
SWA_CASES = [(64, 16, 0, 0, None), (100, 16, 3, 0, None), (37, 8, 2, 7, None), (5, 16, 4, 15, None),
             (5, 16, 0, 3, None), (1, 16, 2, 15, None), (7, 4, 1, 10, None), (29, 1, 2, 0, None),
             (63, 10, 3, 9, 4), (40, 12, 0, 5, 7)]


@pytest.mark.parametrize("T,window,P,n_cached,block", SWA_CASES,
                         ids=[f"T{c[0]}-w{c[1]}-P{c[2]}-cache{c[3]}-block{c[4]}" for c in SWA_CASES])
def test_sliding_window_attention_equals_dense_reference(T, window, P, n_cached, block):
    torch.manual_seed(0)
    pos = 50  # stream position of the first query; the cache holds the n_cached tokens before it
    q = torch.randn(2, 3, T, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, n_cached + T, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    prefix = tuple(torch.randn(2, 3, P, 8, dtype=torch.float64, requires_grad=True) for _ in range(2)) if P else None
    inputs = [q, k, v] + (list(prefix) if P else [])
    out = sliding_window_attention(q, k, v, window, prefix=prefix, q_start=pos, kv_start=pos - n_cached, block=block)
    ref = dense_window_reference(q, k, v, window, prefix, pos, pos - n_cached)
    assert (out - ref).abs().max() <= TOL
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert (a - b).abs().max() <= TOL


@pytest.mark.parametrize("n_persistent", [0, 3])
def test_windowed_layer_equals_dense_reference_and_decodes_token_by_token(n_persistent):
    torch.manual_seed(0)
    layer = Attention(32, 4, window=6, n_persistent=n_persistent).double()
    torch.nn.init.normal_(layer.wqkv.weight, std=0.3)
    if layer.persistent is not None:
        torch.nn.init.normal_(layer.persistent)
    x = torch.randn(2, 23, 32, dtype=torch.float64, requires_grad=True)
    full, _ = layer(x)
    q, k, v = layer.qkv(x, torch.arange(23))
    ref = layer._out(dense_window_reference(q, k, v, 6, layer.persistent_kv(2), 0, 0))
    assert (full - ref).abs().max() <= TOL
    g = torch.randn_like(full)
    params = [x] + list(layer.parameters())
    for a, b in zip(torch.autograd.grad(full, params, g), torch.autograd.grad(ref, params, g)):
        assert (a - b).abs().max() <= TOL
    cache, outs = None, []
    for t in range(23):
        y, cache = layer(x[:, t:t + 1], cache, t)
        outs.append(y)
    assert (torch.cat(outs, 1) - full).abs().max() <= TOL


def test_no_sequence_sized_mask_in_sliding_window_or_mac(monkeypatch):
    """MAG's sliding-window attention builds no dense mask at all; MAC's masks are bounded by one segment, not T."""
    shapes = []
    real = attention_module.materialize

    def recording(mod, q_len, kv_len, device=None):
        shapes.append((q_len, kv_len))
        return real(mod, q_len, kv_len, device)

    monkeypatch.setattr(attention_module, "materialize", recording)
    common = dict(vocab_size=61, dim=32, n_layers=2, heads=4, max_seq_len=512, window=16, n_persistent=3,
                  segment_len=32, mac_memory_tokens=16, memory=dict(chunk_size=4))
    toks = torch.randint(0, 61, (1, 300))
    with torch.no_grad():
        build_model(ModelConfig(variant="mag", **common))(toks)
        assert shapes == []
        build_model(ModelConfig(variant="mac", **common))(toks)
    assert shapes and max(q for q, _ in shapes) <= 32 and max(kv for _, kv in shapes) <= 3 + 16 + 32
