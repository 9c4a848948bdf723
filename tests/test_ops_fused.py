"""The fused CPU kernels against plain PyTorch (float64, 1e-12): the memory's causal conv + SiLU (and its PyTorch
taps) against F.conv1d, SwiGLU's gating against F.silu(gate) * up, the per-head q / k / v norms against
F.normalize and an RMS norm written out, the gated read-out norm against a per-head loop."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from titans_train.ops import fused
from titans_train.ops.fused import causal_conv_silu, causal_conv_silu_taps, gated_head_norm, gated_head_norm_torch, head_norms, head_norms_torch, swiglu

TOL = 1e-12


def reference(seq, weight, since):
    """SiLU of F.conv1d, one document segment at a time: a token's taps before its document start see zeros."""
    B, n, C = seq.shape
    K = weight.shape[0]
    T = n - (K - 1)
    out = []
    for b in range(B):
        rows = []
        for t in range(T):
            window = seq[b, t : t + K]  # (K, C): taps K-1..0 tokens back
            if since is not None:
                back = torch.arange(K - 1, -1, -1)
                window = window * (back <= since[b, t])[:, None]
            rows.append(F.conv1d(window.t()[None], weight.t()[:, None, :], groups=C)[0, :, 0])
        out.append(torch.stack(rows))
    return F.silu(torch.stack(out))


def inputs(B, T, C, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randn(B, T + K - 1, C, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(K, C, dtype=torch.float64, generator=g, requires_grad=True)
    return seq, weight


def since_of(starts: list[list[int]], T: int, K: int) -> torch.Tensor:
    t = torch.arange(T)
    reset = torch.zeros(len(starts), T, dtype=torch.bool)
    for b, pos in enumerate(starts):
        reset[b, pos] = True
    start = torch.cummax(torch.where(reset, t, -K), dim=1).values
    return t - start


def _kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the conv runs as PyTorch taps")
    assert fused.available(), f"the fused kernels did not build: {fused._KERNEL.error}"


@pytest.mark.parametrize("path", ["kernel", "taps"])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("starts", [None, [[0, 5], [3]], [[1, 2, 3], []]], ids=["none", "some", "adjacent"])
def test_matches_conv1d(path, K, starts):
    """Odd sizes (C = 37: vector body and scalar tail), forward and every gradient."""
    if path == "kernel":
        _kernel()
    seq, weight = inputs(2, 11, 37, K)
    since = None if starts is None else since_of(starts, 11, K)
    fn = causal_conv_silu if path == "kernel" else causal_conv_silu_taps
    out, ref = fn(seq, weight, since), reference(seq, weight, since)
    assert (out - ref).abs().max() <= TOL
    grad = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    got = torch.autograd.grad(out, (seq, weight), grad)
    want = torch.autograd.grad(ref, (seq, weight), grad)
    for g, w in zip(got, want):
        assert g.abs().max() > 0 and (g - w).abs().max() <= TOL


def test_kernel_float32_and_wide_channels():
    """float32 at the layer's width (3 x 256 channels, more than one block per thread) and T = 300."""
    _kernel()
    seq, weight = inputs(2, 300, 768, 4, seed=1)
    since = since_of([[7, 200], []], 300, 4)
    s32, w32 = (x.detach().float().requires_grad_() for x in (seq, weight))
    out = causal_conv_silu(s32, w32, since)
    ref = causal_conv_silu_taps(seq, weight, since)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (s32, w32), grad.float())
    want = torch.autograd.grad(ref, (seq, weight), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 7, 2 * 37), (5, 2 * 704)], ids=["odd-width", "mlp-width"])
def test_swiglu_matches_silu_times_up(shape):
    _kernel()
    g = torch.Generator().manual_seed(2)
    gu = (3 * torch.randn(*shape, dtype=torch.float64, generator=g)).requires_grad_()
    out = swiglu(gu)
    gate, up = gu.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    assert out.shape == ref.shape and (out - ref).abs().max() <= TOL
    grad = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    got, want = torch.autograd.grad(out, gu, grad)[0], torch.autograd.grad(ref, gu, grad)[0]
    assert (got - want).abs().max() <= TOL
    x32 = gu.detach().float()  # float32 and a non-contiguous input (a view of the last dim)
    wide = torch.cat([x32, x32], dim=-1)[..., : shape[-1]]
    torch.testing.assert_close(swiglu(wide), (F.silu(x32.chunk(2, -1)[0]) * x32.chunk(2, -1)[1]), rtol=1e-6, atol=1e-6)


def head_norms_reference(x, heads, modes):
    """Each part and head on its own: F.normalize, or x / sqrt(mean(x^2) + 1e-6) written out."""
    B, T, C = x.shape
    D = C // (len(modes) * heads)
    out = []
    for p, mode in enumerate(modes):
        per_head = []
        for h in range(heads):
            y = x[..., (p * heads + h) * D : (p * heads + h + 1) * D]
            if mode == "l2":
                y = F.normalize(y, dim=-1)
            elif mode == "rms":
                y = y / torch.sqrt((y * y).sum(-1, keepdim=True) / D + 1e-6)
            per_head.append(y)
        out.append(torch.stack(per_head, dim=1))  # (B, H, T, D)
    return out


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("modes", [("l2", "l2", "rms"), ("l2", "l2", None), ("l2",)], ids=["qkv", "no-vnorm", "q"])
def test_head_norms_match_reference(path, modes):
    """Odd head dim (D = 37: vector body and scalar tail), a zero row (F.normalize clamps its norm), a tiny one,
    forward and gradient; the kernel's outputs are contiguous (B, H, T, D)."""
    if path == "kernel":
        _kernel()
    g = torch.Generator().manual_seed(3)
    B, T, H, D = 2, 9, 3, 37
    x = torch.randn(B, T, len(modes) * H * D, dtype=torch.float64, generator=g)
    x[0, 2, :D] = 0.0  # part 0, head 0: the clamped norm
    x[1, 4, D : 2 * D] *= 1e-14  # below the clamp too
    x.requires_grad_()
    fn = head_norms if path == "kernel" else head_norms_torch
    out, ref = fn(x, H, modes), head_norms_reference(x, H, modes)
    assert len(out) == len(modes)
    for o, r in zip(out, ref):
        assert o.shape == (B, H, T, D) and (o - r).abs().max() <= TOL
        if path == "kernel":
            assert o.is_contiguous()
    grads = [torch.cos(torch.arange(o.numel(), dtype=o.dtype) * (i + 1)).view_as(o) for i, o in enumerate(out)]
    got = torch.autograd.grad(out, x, grads)[0]
    want = torch.autograd.grad(ref, x, grads)[0]
    scale = want.abs().max()  # the clamped rows' gradients are dy / 1e-12
    assert scale > 0 and (got - want).abs().max() <= TOL * scale


def test_head_norms_kernel_float32_and_unused_part():
    """float32 at the layer's shape (4 heads of 64, T = 300), and a gradient through q and v only (k unused)."""
    _kernel()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 300, 3 * 256, dtype=torch.float64, generator=g)
    x32 = x.float().requires_grad_()
    x = x.requires_grad_()
    modes = ("l2", "l2", "rms")
    q, k, v = head_norms(x32, 4, modes)
    rq, rk, rv = head_norms_reference(x, 4, modes)
    for o, r in ((q, rq), (k, rk), (v, rv)):
        torch.testing.assert_close(o.double(), r, rtol=1e-6, atol=1e-6)
    dq, dv = torch.randn_like(rq), torch.randn_like(rv)
    got = torch.autograd.grad((q, v), x32, (dq.float(), dv.float()))[0]
    want = torch.autograd.grad((rq, rv), x, (dq, dv))[0]
    assert got[..., 256:512].abs().max() == 0  # k's features get no gradient
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def gated_head_norm_reference(y, weight, gate):
    """One head at a time: y / sqrt(mean(y^2) + 1e-6) * weight, heads side by side, times gate * sigmoid(gate)."""
    heads = [y[:, h] / torch.sqrt((y[:, h] ** 2).sum(-1, keepdim=True) / y.shape[-1] + 1e-6) * weight[h]
             for h in range(y.shape[1])]
    return torch.cat(heads, dim=-1) * gate * torch.sigmoid(gate)


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("shape", [(2, 3, 9, 37), (1, 4, 300, 64)], ids=["odd", "layer"])
def test_gated_head_norm_matches_reference(path, shape):
    """float64 forward and every gradient (y, weight, gate); float32 at the layer's shape."""
    if path == "kernel":
        _kernel()
    fn = gated_head_norm if path == "kernel" else gated_head_norm_torch
    B, H, T, D = shape
    g = torch.Generator().manual_seed(5)
    y = torch.randn(B, H, T, D, dtype=torch.float64, generator=g).requires_grad_()
    w = (1 + 0.3 * torch.randn(H, D, dtype=torch.float64, generator=g)).requires_grad_()
    gate = (2 * torch.randn(B, T, H * D, dtype=torch.float64, generator=g)).requires_grad_()
    out, ref = fn(y, w, gate), gated_head_norm_reference(y, w, gate)
    assert out.shape == (B, T, H * D) and (out - ref).abs().max() <= TOL
    grad = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    got = torch.autograd.grad(out, (y, w, gate), grad)
    want = torch.autograd.grad(ref, (y, w, gate), grad)
    for a, b in zip(got, want):
        assert a.abs().max() > 0 and (a - b).abs().max() <= TOL * max(1.0, b.abs().max().item())
    f32 = [t.detach().float().requires_grad_() for t in (y, w, gate)]
    out32 = fn(*f32)
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out32, f32, grad.float()), want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
