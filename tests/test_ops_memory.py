"""The chunked memory op against its token-loop reference (float64): outputs, final state, every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titans_train.ops import debug_checks, memory_update, memory_update_reference

TOL = 1e-9  # max abs error, float64, for outputs, state and gradients


@pytest.fixture(autouse=True)
def _debug_checks():
    """Every call in these tests also runs the op's value checks (rates in [0, 1], finite inputs)."""
    with debug_checks(True):
        yield
B, H, D = 2, 2, 8


def make_inputs(T: int, n_layers: int, per_layer_theta=False, layer_norm=True, seed: int = 0, dtype=torch.float64,
                channel_alpha=False, batch_heads=(B, H)):
    """Well-conditioned inputs as the layer produces them: unit-norm q/k, rates in (0, 1), small initial state.

    Conditioning matters for a 1e-9 absolute tolerance: an inner gradient descent that diverges (weights that
    grow without LN, or shrink under LN until it amplifies round-off) turns 1e-16 round-off into any error.
    """
    B, H = batch_heads
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q = F.normalize(randn(B, H, T, D), dim=-1)
    k = F.normalize(randn(B, H, T, D), dim=-1)
    v = randn(B, H, T, D)
    theta = 0.05 * (rand(B, H, T, n_layers) if per_layer_theta else rand(B, H, T))
    eta = 0.2 + 0.8 * rand(B, H, T)
    alpha = 0.02 * (rand(B, H, T, D) if channel_alpha else rand(B, H, T))  # the weights keep their scale over T
    dims = [D] + [4 * D] * (n_layers - 1) + [D]
    # |k| = 1: with LN, a unit-std first layer and 2/sqrt(in) after it keep f(k) at unit scale (LN well
    # conditioned); without LN, 1/sqrt(in) keeps the inner gradient step stable.
    scale = [(1.0 if i == 0 else 2.0 / d**0.5) if layer_norm else 1.0 / d**0.5 for i, d in enumerate(dims[:-1])]
    W = tuple(randn(B, H, dims[i], dims[i + 1]) * scale[i] for i in range(n_layers))
    S = tuple(0.05 * randn(B, H, dims[i], dims[i + 1]) for i in range(n_layers))
    tensors = [q, k, v, theta, eta, alpha, *W, *S]
    for t in tensors:
        t.requires_grad_(True)
    return (q, k, v, theta, eta, alpha, W, S), tensors


def run_with_grads(fn, args, leaves, **kw):
    y, W, S = fn(*args, **kw)
    # A fixed random-looking cotangent for y and the state, so every output feeds the gradient differently.
    cot = torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device)).view_as(y)
    loss = (y * cot).sum() + sum((w * w).sum() for w in W) + sum(1.3 * s.sum() for s in S)
    grads = torch.autograd.grad(loss, leaves)
    return y, W, S, grads


NAMES = ["q", "k", "v", "theta", "eta", "alpha"]


def compare(T, chunk_size, n_layers, residual, layer_norm, per_layer_theta=False, compile=False, impl="auto",
            channel_alpha=False, batch_heads=(B, H), ln_eps=None, forget_to=False):
    if impl == "cpu":
        _cpu_kernel()
    args, leaves = make_inputs(T, n_layers, per_layer_theta, layer_norm, channel_alpha=channel_alpha,
                               batch_heads=batch_heads)
    kw = dict(chunk_size=chunk_size, residual=residual, layer_norm=layer_norm)
    if ln_eps is not None:
        kw["ln_eps"] = ln_eps
    if forget_to:  # a decay target other than the weights themselves (W_0 of the layer), with its own gradient;
        g = torch.Generator().manual_seed(1)  # "shared": one for every batch row (batch size 1), as the layer gives
        src = [w[:1] if forget_to == "shared" else w for w in args[6]]
        kw["forget_to"] = tuple((w.detach() + 0.5 * torch.randn(w.shape, generator=g, dtype=w.dtype) * w.detach().std())
                                .requires_grad_(True) for w in src)
        leaves = [*leaves, *kw["forget_to"]]
    fast = run_with_grads(memory_update, args, leaves, compile=compile, impl=impl, **kw)
    ref = run_with_grads(memory_update_reference, args, leaves, **kw)
    errors = {"y": (fast[0] - ref[0]).abs().max().item()}
    for i in range(n_layers):
        errors[f"weights_out[{i}]"] = (fast[1][i] - ref[1][i]).abs().max().item()
        errors[f"momentum_out[{i}]"] = (fast[2][i] - ref[2][i]).abs().max().item()
    names = NAMES + [f"weights[{i}]" for i in range(n_layers)] + [f"momentum[{i}]" for i in range(n_layers)] \
        + ([f"forget_to[{i}]" for i in range(n_layers)] if forget_to else [])
    for name, gf, gr in zip(names, fast[3], ref[3]):
        errors[f"grad {name}"] = (gf - gr).abs().max().item()
        # the comparison must be about real numbers, not two zeros or two NaNs
        assert torch.isfinite(gr).all() and gr.abs().max() > 0, name
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"max abs errors above {TOL}: {bad}"


def _cpu_kernel():
    """The compiled CPU kernel (built on first use). Skipped only where there is no C++ compiler; where there is
    one, a failed build fails the test with the compiler's reason."""
    import shutil

    from titans_train.ops.neural_memory import cpu

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the CPU kernel cannot be built here (the op falls back to the autograd step)")
    assert cpu.available(), f"the CPU kernel did not build: {cpu.build_error()}"
    return cpu


# the compiled C++ kernel, the hand-written-backward Python Function and the per-chunk autograd step
IMPLS = ["cpu", "autograd"]


@pytest.fixture
def cpu_kernel():
    return _cpu_kernel()
FORMS, FORM_IDS = [(True, True), (False, False), (True, False), (False, True)], ["res+ln", "plain", "res", "ln"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("n_layers", [1, 2, 3], ids=lambda n: f"L{n}")
@pytest.mark.parametrize(
    "residual,layer_norm", [(True, True), (False, False), (True, False), (False, True)], ids=["res+ln", "plain", "res", "ln"]
)
def test_fast_matches_reference(chunk_size, n_layers, residual, layer_norm, impl):
    T = 100 if chunk_size == 64 else 37  # never a multiple of the chunk: the last chunk is partial
    compare(T, chunk_size, n_layers, residual, layer_norm, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_per_layer_theta(chunk_size, impl):
    compare(37, chunk_size, 2, True, True, per_layer_theta=True, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("residual", [True, False], ids=["res+ln", "ln"])
def test_ln_eps_matches_reference(residual, impl):
    """A LayerNorm epsilon on f's scale (0.5 here, against f at unit std) reaches every path: forward, the inner
    gradient through LN and the backward of both."""
    compare(37, 4, 2, residual, True, impl=impl, ln_eps=0.5)
    args, _ = make_inputs(37, 2)
    with torch.no_grad():
        assert not torch.allclose(memory_update(*args, chunk_size=4, impl=impl, ln_eps=0.5)[0],
                                  memory_update(*args, chunk_size=4, impl=impl)[0], atol=1e-3)


# ---- forget_to: the gate decays towards given weights (W_0) instead of zero ---------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [1, 4, 16], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("n_layers", [1, 2, 3], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("residual,layer_norm", FORMS[:2], ids=FORM_IDS[:2])
def test_forget_to_matches_reference(chunk_size, n_layers, residual, layer_norm, impl):
    compare(37, chunk_size, n_layers, residual, layer_norm, forget_to=True, impl=impl)


@pytest.mark.parametrize("extra", [dict(channel_alpha=True), dict(per_layer_theta=True), dict(ln_eps=0.1),
                                   dict(per_layer_theta=True, ln_eps=0.1, impl="cpu"),
                                   dict(batch_heads=(3, 1), impl="cpu")],
                         ids=["channel", "per_layer_theta", "eps0.1", "cpu-per_layer_theta-eps0.1", "cpu-3x1"])
def test_forget_to_with_the_other_options(extra):
    compare(37, 4, 2, True, True, forget_to=True, **extra)


@pytest.mark.parametrize("extra", [dict(impl="cpu"), dict(impl="autograd"), dict(impl="autograd", channel_alpha=True),
                                   dict(impl="cpu", batch_heads=(3, 2), n_layers=3)],
                         ids=["cpu", "autograd", "autograd-channel", "cpu-3x2-L3"])
def test_forget_to_shared_by_the_batch_rows(extra):
    """A target of batch size 1 (the layer's W_0) is read by every row without a per-row copy; its gradient sums
    the rows'."""
    n_layers = extra.pop("n_layers", 2)
    compare(37, 4, n_layers, True, True, forget_to="shared", **extra)


def test_forget_to_definition_and_kernels():
    """Written out for the linear memory at chunk 1: W_t = (1 - alpha_t) W_{t-1} + alpha_t W_target + S_t; zero
    targets are the paper's form; a target shaped unlike the weights is refused."""
    args, _ = make_inputs(9, 1)
    q, k, v, theta, eta, alpha, W, S = (a.detach() if torch.is_tensor(a) else tuple(x.detach() for x in a) for a in args)
    target = (torch.randn(W[0].shape, dtype=W[0].dtype, generator=torch.Generator().manual_seed(2)),)
    kw = dict(chunk_size=1, residual=False, layer_norm=False)
    _, W1, S1 = memory_update(q, k, v, theta, eta, alpha, W, S, forget_to=target, **kw)
    w, s = W[0], S[0]
    for t in range(9):
        err = torch.einsum("bhi,bhio->bho", k[:, :, t], w) - v[:, :, t]
        u = 2 * torch.einsum("bhi,bho->bhio", k[:, :, t], err)
        s = eta[:, :, t, None, None] * s - theta[:, :, t, None, None] * u
        a = alpha[:, :, t, None, None]
        w = (1 - a) * w + a * target[0] + s
    torch.testing.assert_close(W1[0], w, rtol=0, atol=1e-12)
    torch.testing.assert_close(S1[0], s, rtol=0, atol=1e-12)
    zero = memory_update(q, k, v, theta, eta, alpha, W, S, forget_to=(torch.zeros_like(W[0]),), **kw)
    plain = memory_update(q, k, v, theta, eta, alpha, W, S, **kw)
    for a, b in zip(zero, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="forget_to shapes"):
        memory_update(q, k, v, theta, eta, alpha, W, S, forget_to=(target[0][:, :, :1],), **kw)


# ---- channel-wise alpha: (B, H, T, D), row r of the first layer decays with alpha[..., r] -------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("n_layers", [1, 2, 3], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("residual,layer_norm", FORMS, ids=FORM_IDS)
def test_channel_alpha_matches_reference(chunk_size, n_layers, residual, layer_norm):
    T = 100 if chunk_size == 64 else 37  # never a multiple of the chunk: the last chunk is partial
    compare(T, chunk_size, n_layers, residual, layer_norm, channel_alpha=True)


def test_channel_alpha_chunk_one_is_a_row_wise_decay():
    """The definition, written out for the linear memory at chunk 1: W_t = diag(1 - alpha_t) W_{t-1} + S_t."""
    args, _ = make_inputs(9, 1, channel_alpha=True)
    q, k, v, theta, eta, alpha, W, S = (a.detach() if torch.is_tensor(a) else a for a in args)
    _, W1, S1 = memory_update(q, k, v, theta, eta, alpha, W, S, chunk_size=1, residual=False, layer_norm=False)
    w, s = W[0].detach(), S[0].detach()
    for t in range(9):
        err = torch.einsum("bhi,bhio->bho", k[:, :, t], w) - v[:, :, t]
        u = 2 * torch.einsum("bhi,bho->bhio", k[:, :, t], err)
        s = eta[:, :, t, None, None] * s - theta[:, :, t, None, None] * u
        w = (1 - alpha[:, :, t, :, None]) * w + s  # row r (input channel r) keeps 1 - alpha_t[r]
    torch.testing.assert_close(W1[0].detach(), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(S1[0].detach(), s, rtol=0, atol=1e-12)


def test_channel_alpha_per_layer_theta():
    compare(37, 4, 2, True, True, per_layer_theta=True, channel_alpha=True)


@pytest.mark.parametrize("elements", [1, 3 * B * H * 4 * 4 * D], ids=["group1", "group3"])
def test_channel_alpha_chunk_groups(elements, monkeypatch):
    """The per-channel terms are built a few chunks at a time (checkpointed): one chunk per group, and groups of
    3 chunks that do not divide the 10 chunks, give the reference's results."""
    from titans_train.ops.neural_memory import chunk

    monkeypatch.setattr(chunk, "CHANNEL_GROUP_ELEMENTS", elements)
    compare(37, 4, 2, True, True, channel_alpha=True)


def test_equal_channels_equal_scalar_alpha():
    """alpha repeated over the channels is the (B, H, T) form: outputs, state and every gradient (alpha's gradient
    summed over the channels by the expand). Different code paths, so equal up to round-off."""
    args, leaves = make_inputs(37, 3)
    scalar = run_with_grads(memory_update, args, leaves, chunk_size=8)
    args = list(args)
    args[5] = args[5].unsqueeze(-1).expand(B, H, 37, D)
    channel = run_with_grads(memory_update, args, leaves, chunk_size=8)
    assert (scalar[0] - channel[0]).abs().max() <= TOL
    for a, b in zip(scalar[1] + scalar[2] + scalar[3], channel[1] + channel[2] + channel[3]):
        assert (a - b).abs().max() <= TOL


def test_channel_alpha_impls():
    """"cpu" has no channel-wise form and says so; "auto" and "autograd" run the autograd step."""
    args = _good(channel_alpha=True)
    for impl in ("cpu",):
        with pytest.raises(ValueError, match=rf"impl='{impl}' does not support channel-wise alpha"):
            memory_update(*args, impl=impl)
    y_auto, *_ = memory_update(*args, impl="auto")
    y_grad, *_ = memory_update(*args, impl="autograd")
    assert torch.equal(y_auto, y_grad)


def test_channel_alpha_without_grad_and_chained():
    """Under no_grad (no checkpointing) and in two chunk-aligned calls, the same as one call with gradients."""
    args, _ = make_inputs(48, 2, channel_alpha=True)
    q, k, v, theta, eta, alpha, W, S = args
    y, W1, S1 = memory_update(*args, chunk_size=16)
    with torch.no_grad():
        y_ng, W_ng, _ = memory_update(*args, chunk_size=16)
    assert (y_ng - y).abs().max() <= TOL and (W_ng[0] - W1[0]).abs().max() <= TOL
    cut = 32
    part = lambda a, sl: [x[:, :, sl] for x in a]  # noqa: E731
    ya, Wa, Sa = memory_update(*part((q, k, v, theta, eta, alpha), slice(None, cut)), W, S, chunk_size=16)
    yb, Wb, Sb = memory_update(*part((q, k, v, theta, eta, alpha), slice(cut, None)), Wa, Sa, chunk_size=16)
    assert (torch.cat([ya, yb], 2) - y).abs().max() <= TOL
    for a, b in zip(W1 + S1, Wb + Sb):
        assert (a - b).abs().max() <= TOL


HAND_WRITTEN = ["cpu"]  # the paths with a hand-written backward on CPU (the Triton kernels: test_ops_memory_triton.py)


@pytest.mark.parametrize("impl", HAND_WRITTEN)
@pytest.mark.parametrize("segment", [1, 3, 100])
def test_checkpoint_segments(impl, segment, monkeypatch):
    """The hand-written backwards recompute anchors from one stored state per segment of chunks: any segment
    length, including one that does not divide the number of chunks or exceeds it, gives the reference's results."""
    monkeypatch.setattr(_cpu_kernel(), "SEGMENT", segment)
    compare(37, 4, 2, True, True, impl=impl)
    compare(37, 4, 3, False, True, per_layer_theta=True, impl=impl)


@pytest.mark.parametrize("impl", HAND_WRITTEN)
def test_without_state_gradient_and_no_grad(impl):
    """Only y feeds the loss (no gradient arrives for the final state); under no_grad (no checkpoints kept) the
    results are the same; a second call reuses nothing stale."""
    if impl == "cpu":
        _cpu_kernel()
    for _ in range(2):
        args, leaves = make_inputs(37, 2)
        y_f = memory_update(*args, chunk_size=8, impl=impl)[0]
        g_f = torch.autograd.grad(y_f.square().sum(), leaves)
        y_r = memory_update_reference(*args, chunk_size=8)[0]
        g_r = torch.autograd.grad(y_r.square().sum(), leaves)
        assert (y_f - y_r).abs().max() <= TOL
        for a, b in zip(g_f, g_r):
            assert (a - b).abs().max() <= TOL
        with torch.no_grad():
            y_n = memory_update(*args, chunk_size=8, impl=impl)[0]
        assert torch.equal(y_n, y_f.detach())


@pytest.mark.parametrize("impl", HAND_WRITTEN)
def test_float32_close_to_autograd(impl):
    if impl == "cpu":
        _cpu_kernel()
    args, leaves = make_inputs(70, 2, dtype=torch.float32)
    kw = dict(chunk_size=16)
    f = run_with_grads(memory_update, args, leaves, impl=impl, **kw)
    a = run_with_grads(memory_update, args, leaves, impl="autograd", **kw)
    torch.testing.assert_close(f[0], a[0], rtol=1e-4, atol=1e-5)
    for gf, ga in zip(f[3], a[3]):
        torch.testing.assert_close(gf, ga, rtol=1e-3, atol=1e-4)


def test_cpu_kernel_thread_invariant(cpu_kernel):
    """Each (batch, head) item runs on one thread, so float32 results do not depend on the thread count, bit for
    bit."""
    args, leaves = make_inputs(70, 2, dtype=torch.float32)
    kw = dict(chunk_size=16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(memory_update, args, leaves, impl="cpu", **kw)
        torch.set_num_threads(max(2, threads))
        many = run_with_grads(memory_update, args, leaves, impl="cpu", **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and all(torch.equal(a, b) for a, b in zip(one[3], many[3]))


def test_auto_picks_the_cpu_kernel(cpu_kernel):
    from titans_train.ops.neural_memory.chunk import choose_impl

    q = torch.zeros(1, 1, 4, 8)
    assert choose_impl("auto", False, 16, q) == "cpu"
    assert choose_impl("auto", True, 16, q) == "autograd"  # compile=True compiles the autograd step
    assert choose_impl("auto", False, 16, q, channel_alpha=True) == "autograd"
    assert choose_impl("auto", False, 16, q.half()) == "autograd"
    with pytest.raises(ValueError, match="float32/float64 CPU"):
        choose_impl("cpu", False, 16, q.half())


def test_bad_impl():
    with pytest.raises(ValueError, match="impl must be"):
        memory_update(*_good(), impl="nope")


@pytest.mark.parametrize("channel_alpha", [False, True], ids=["alpha-head", "alpha-channel"])
def test_compiled_step_matches_reference(channel_alpha):
    """The torch.compile'd chunk step (fused elementwise work) is held to the same float64 tolerance."""
    compare(37, 16, 2, True, True, compile=True, channel_alpha=channel_alpha)


@pytest.mark.parametrize("channel_alpha", [False, True], ids=["alpha-head", "alpha-channel"])
@pytest.mark.parametrize("T", [1, 5, 16])
def test_short_sequences(T, channel_alpha):
    """T smaller than, or equal to, one chunk."""
    compare(T, 16, 2, True, True, channel_alpha=channel_alpha)


def test_chunk_one_equals_fully_sequential_update():
    """With chunk 1 every gradient is taken at the current weights: a plain online gradient step with momentum."""
    args, _ = make_inputs(9, 1)
    q, k, v, theta, eta, alpha, W, S = args
    y, W1, S1 = memory_update(q, k, v, theta, eta, alpha, W, S, chunk_size=1, residual=False, layer_norm=False)
    w, s = W[0].detach(), S[0].detach()
    for t in range(9):
        kt, vt = k[:, :, t].detach(), v[:, :, t].detach()
        err = torch.einsum("bhi,bhio->bho", kt, w) - vt  # linear memory: grad = 2 k^T (k W - v)
        u = 2 * torch.einsum("bhi,bho->bhio", kt, err)
        s = eta[:, :, t, None, None].detach() * s - theta[:, :, t, None, None].detach() * u
        w = (1 - alpha[:, :, t, None, None].detach()) * w + s
    torch.testing.assert_close(W1[0].detach(), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(S1[0].detach(), s, rtol=0, atol=1e-12)


def test_chunks_are_aligned_to_call_start_and_state_chains():
    """Two calls on chunk-aligned halves equal one call over the whole sequence."""
    args, _ = make_inputs(48, 2)
    q, k, v, theta, eta, alpha, W, S = args
    y, W1, S1 = memory_update(q, k, v, theta, eta, alpha, W, S, chunk_size=16)
    cut = 32
    ya, Wa, Sa = memory_update(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], theta[:, :, :cut], eta[:, :, :cut],
                               alpha[:, :, :cut], W, S, chunk_size=16)
    yb, Wb, Sb = memory_update(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], theta[:, :, cut:], eta[:, :, cut:],
                               alpha[:, :, cut:], Wa, Sa, chunk_size=16)
    assert (torch.cat([ya, yb], 2) - y).abs().max() <= TOL
    for a, b in zip(W1 + S1, Wb + Sb):
        assert (a - b).abs().max() <= TOL


def test_reduced_precision_keeps_state_fp32():
    args, _ = make_inputs(20, 2, dtype=torch.float32)
    q, k, v, theta, eta, alpha, W, S = args
    y32, W32, _ = memory_update(q, k, v, theta, eta, alpha, W, S, chunk_size=8)
    bf = lambda x: x.detach().to(torch.bfloat16)  # noqa: E731
    y16, W16, S16 = memory_update(bf(q), bf(k), bf(v), theta, eta, alpha, W, S, chunk_size=8)
    assert y16.dtype == torch.bfloat16 and W16[0].dtype == torch.float32 and S16[0].dtype == torch.float32
    assert (y16.float() - y32).abs().max() < 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, W_ac, _ = memory_update(q, k, v, theta, eta, alpha, W, S, chunk_size=8)
    assert y_ac.dtype == torch.float32 and W_ac[0].dtype == torch.float32
    torch.testing.assert_close(y_ac, y32)


# ---- bad input -------------------------------------------------------------------------------------------------


def _good(T=10, n_layers=2, channel_alpha=False):
    args, _ = make_inputs(T, n_layers, channel_alpha=channel_alpha)
    return [a.detach() if torch.is_tensor(a) else tuple(x.detach() for x in a) for a in args]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), r"q must be \(B, H, T, D\)"),
        (lambda a: a.__setitem__(1, a[1][:, :, :5]), r"k.shape=.* must equal q.shape"),
        (lambda a: a.__setitem__(3, a[3][:, :1]), r"theta.shape="),
        (lambda a: a.__setitem__(4, a[4].unsqueeze(-1)), r"eta.shape="),
        (lambda a: a.__setitem__(5, a[5][..., :3]), r"alpha.shape="),
        (lambda a: a.__setitem__(5, a[5].unsqueeze(-1).expand(*a[5].shape, 3)),
         r"alpha.shape=\(2, 2, 10, 3\) must be \(B, H, T\)=\(2, 2, 10\) or, channel-wise, "
         r"\(B, H, T, D\)=\(2, 2, 10, 8\)"),
        (lambda a: a.__setitem__(5, a[5][..., None, None]), r"alpha.shape=\(2, 2, 10, 1, 1\) must be"),
        (lambda a: a.__setitem__(6, (a[6][0][..., :7, :], a[6][1])), r"weights\[0\].shape\[2\]=7 must equal q.shape\[3\]"),
        (lambda a: (a.__setitem__(6, (a[6][0], a[6][1][..., :5])), a.__setitem__(7, (a[7][0], a[7][1][..., :5]))),
         r"weights\[1\].shape\[3\]=5 must equal q.shape\[3\]"),
        (lambda a: a.__setitem__(7, a[7][:1]), r"len\(momentum\)=1 must equal len\(weights\)=2"),
        (lambda a: a.__setitem__(7, (a[7][0][:1], a[7][1])), r"momentum\[0\].shape=.* must equal weights\[0\].shape"),
        (lambda a: a.__setitem__(2, a[2].float()), r"v.dtype=torch.float32 must equal q.dtype=torch.float64"),
        (lambda a: a.__setitem__(4, a[4].long()), r"eta must be a floating-point tensor"),
        (lambda a: a.__setitem__(6, ()), r"at least one memory layer"),
    ],
    ids=["q-rank", "k-shape", "theta-shape", "eta-rank", "alpha-len", "alpha-channels", "alpha-rank", "w0-in", "wL-out",
         "momentum-len", "momentum-shape", "dtype", "int-rate", "no-layers"],
)
def test_bad_input_names_the_argument(mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        memory_update(*args)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        memory_update(*_good(), chunk_size=0)


def test_debug_mode_checks_values():
    args = _good()
    args[3] = args[3] + 2.0  # theta outside [0, 1]
    with debug_checks(False):
        memory_update(*args)  # no sync, no check outside debug mode
    with debug_checks(), pytest.raises(ValueError, match=r"theta must lie in \[0, 1\]"):
        memory_update(*args)
    args = _good()
    args[0] = args[0].clone()
    args[0][0, 0, 0, 0] = float("nan")
    with debug_checks(), pytest.raises(ValueError, match="q holds non-finite values"):
        memory_update(*args)
    args = _good(channel_alpha=True)
    args[5] = args[5].clone()
    args[5][0, 1, 2, 3] = 1.5  # one channel outside [0, 1]
    with debug_checks(), pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        memory_update(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("channel_alpha", [False, True], ids=["alpha-head", "alpha-channel"])
def test_gpu_matches_cpu_reference(channel_alpha):
    args, _ = make_inputs(37, 2, channel_alpha=channel_alpha)
    dev = [a.detach().cuda() if torch.is_tensor(a) else tuple(x.detach().cuda() for x in a) for a in args]
    leaves_cpu = [a for a in args[:6]] + list(args[6]) + list(args[7])
    leaves_gpu = [a.requires_grad_() for a in dev[:6]] + [w.requires_grad_() for w in dev[6]] + [
        s.requires_grad_() for s in dev[7]]
    ref = run_with_grads(memory_update_reference, args, leaves_cpu, chunk_size=16)
    fast = run_with_grads(memory_update, dev, leaves_gpu, chunk_size=16)
    assert (fast[0].cpu() - ref[0]).abs().max() <= TOL
    for gf, gr in zip(fast[3], ref[3]):
        assert (gf.cpu() - gr).abs().max() <= TOL
