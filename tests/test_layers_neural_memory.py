"""NeuralMemory layer: streaming in pieces equals one call; read-only retrieval; reset; gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titans_train.layers.neural_memory import NeuralMemory
from titans_train.ops import debug_checks, memory_apply, memory_update_reference

TOL = 1e-9


@pytest.fixture(autouse=True)
def _debug_checks():
    """Every call in these tests also runs the op's value checks (rates in [0, 1], finite inputs)."""
    with debug_checks(True):
        yield


def make_layer(**kw) -> NeuralMemory:
    torch.manual_seed(0)
    cfg = dict(dim=24, heads=3, depth=2, chunk_size=8, max_lr=0.2)
    cfg.update(kw)
    layer = NeuralMemory(**cfg).double()
    with torch.no_grad():  # non-trivial conv so that the conv tail matters
        layer.conv.weight.normal_(0.0, 0.5)
    return layer


def random_split(T: int, gen: torch.Generator) -> list[int]:
    sizes, left = [], T
    while left:
        n = int(torch.randint(1, min(left, 13) + 1, (1,), generator=gen))
        sizes.append(n)
        left -= n
    return sizes


RATES = {"theta-shared": {}, "theta-per-layer": {"per_layer_theta": True}, "alpha-channel": {"channel_alpha": True},
         "theta-per-layer+alpha-channel": {"per_layer_theta": True, "channel_alpha": True},
         "forget-to-initial": {"forget_target": "initial", "alpha_bias": -2.0}}


@pytest.mark.parametrize("rates", list(RATES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pieces_of_random_sizes_equal_one_call(seed, rates):
    layer = make_layer(**RATES[rates])
    x = torch.randn(2, 61, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y_full, s_full = layer(x)
    gen = torch.Generator().manual_seed(100 + seed)
    sizes = random_split(61, gen)
    state, ys, t = None, [], 0
    for n in sizes:
        y, state = layer(x[:, t : t + n], state)
        ys.append(y)
        t += n
    assert len(sizes) > 3
    assert (torch.cat(ys, 1) - y_full).abs().max() <= TOL
    assert state.tokens_in_chunk == 61 % 8 == s_full.tokens_in_chunk
    for a, b in zip(state.weights + state.momentum, s_full.weights + s_full.momentum):
        assert (a - b).abs().max() <= TOL


@pytest.mark.parametrize("channel_alpha", [False, True], ids=["alpha-head", "alpha-channel"])
def test_token_by_token_equals_one_call(channel_alpha):
    layer = make_layer(chunk_size=4, channel_alpha=channel_alpha)
    x = torch.randn(1, 19, 24, dtype=torch.float64)
    y_full, _ = layer(x)
    state, ys = None, []
    for t in range(19):
        y, state = layer(x[:, t : t + 1], state)
        ys.append(y)
    assert (torch.cat(ys, 1) - y_full).abs().max() <= TOL


@pytest.mark.parametrize("kernel", [1, 4])
def test_causal_conv_matches_conv1d(kernel):
    """The layer's causal conv is SiLU of F.conv1d over [tail; proj], forward and backward (float64, 1e-12)."""
    layer = make_layer(conv_kernel=kernel)
    gen = torch.Generator().manual_seed(1)
    proj = torch.randn(2, 19, 72, dtype=torch.float64, generator=gen, requires_grad=True)
    tail = torch.randn(2, kernel - 1, 72, dtype=torch.float64, generator=gen, requires_grad=True)
    out, new_tail = layer._causal_conv(proj, tail, slice(None))
    seq = torch.cat([tail, proj], dim=1)
    ref = F.silu(F.conv1d(seq.transpose(1, 2), layer.conv.weight, groups=72).transpose(1, 2))
    assert (out - ref).abs().max() <= 1e-12
    assert torch.equal(new_tail, seq[:, seq.shape[1] - (kernel - 1):])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (proj, tail, layer.conv.weight), grad)
    want = torch.autograd.grad(ref, (proj, tail, layer.conv.weight), grad)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.allclose(g, w, rtol=0, atol=1e-12)


def heads(layer, x):
    """(B, T, H * D) -> (B, H, T, D)."""
    B, T, _ = x.shape
    return x.view(B, T, layer.heads, layer.head_dim).transpose(1, 2)


@pytest.mark.parametrize("forget_target", ["zero", "initial"])
@pytest.mark.parametrize("channel_alpha", [False, True], ids=["alpha-head", "alpha-channel"])
def test_layer_matches_reference_op(channel_alpha, forget_target):
    """The layer's memory read-out is the reference op applied to its own projections."""
    layer = make_layer(channel_alpha=channel_alpha, forget_target=forget_target, alpha_bias=-2.0)
    x = torch.randn(2, 21, 24, dtype=torch.float64)
    out, _ = layer(x)
    # Recompute projections as the layer does and run the token-loop reference.
    qkv, _ = layer._causal_conv(layer.qkv(x), layer.init_state(2).conv_tail, slice(None))
    q, k, v = (heads(layer, t) for t in qkv.split(24, dim=-1))  # the conv's output is after its SiLU
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = v / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # value_norm: unit RMS per head
    theta, eta, alpha = layer._rates(x)
    assert alpha.shape == ((2, 3, 21, 8) if channel_alpha else (2, 3, 21))
    # inner_step="normalized": layer l's theta over its input's expected squared norm (1, then 4 D E[gelu^2])
    D = layer.head_dim
    raw = layer.max_lr * torch.sigmoid(layer.rates(x)).view(2, 21, 3, -1).transpose(1, 2)[..., :1]
    raw = raw * (1 - eta)[..., None]  # momentum_form="ema" (default): theta scaled by 1 - eta
    assert torch.allclose(theta, raw * torch.tensor([1.0, 1 / (4 * D * 0.4252)], dtype=x.dtype))
    s0 = layer.init_state(2)
    target = s0.weights if forget_target == "initial" else None
    y_ref, _, _ = memory_update_reference(q, k, v, theta, eta, alpha, s0.weights, s0.momentum, chunk_size=8,
                                          ln_eps=layer.ln_eps, forget_to=target)
    assert (layer._output(y_ref, x) - out).abs().max() <= TOL
    if forget_target == "initial":  # and not the paper's form (alpha ~0.12 here: the two differ)
        y_zero, _, _ = memory_update_reference(q, k, v, theta, eta, alpha, s0.weights, s0.momentum, chunk_size=8,
                                               ln_eps=layer.ln_eps)
        assert (layer._output(y_zero, x) - out).abs().max() > 1e-3


@pytest.mark.parametrize("channel_alpha", [False, True], ids=["alpha-head", "alpha-channel"])
def test_retrieve_reads_current_weights_without_writing(channel_alpha):
    layer = make_layer(channel_alpha=channel_alpha)
    x = torch.randn(2, 13, 24, dtype=torch.float64)  # 13 = one full chunk + 5 pending
    _, state = layer(x)
    probe = torch.randn(2, 6, 24, dtype=torch.float64)
    h, state2 = layer.retrieve(probe, state)
    assert state2.weights is state.weights and state2.pending is state.pending  # nothing written
    # current weights = reference op over all 13 tokens from W_0
    w_now = layer.current_weights(state)
    y_one, _ = layer(torch.cat([x, probe], 1))  # sanity: retrieve differs from a write-then-read
    assert h.shape == (2, 6, 24) and not torch.allclose(h, y_one[:, 13:])
    # retrieve in two pieces (query conv tail carried) equals one retrieve
    h1, st = layer.retrieve(probe[:, :4], state)
    h2, _ = layer.retrieve(probe[:, 4:], st)
    assert (torch.cat([h1, h2], 1) - h).abs().max() <= TOL
    # and it is memory_apply with the current weights
    proj = F.linear(probe, layer.qkv.weight[:24])
    q, _ = layer._causal_conv(proj, state.query_tail, slice(0, 24))
    q = F.normalize(heads(layer, q), dim=-1)
    expect = layer._output(memory_apply(q, w_now, ln_eps=layer.ln_eps), probe)
    assert (expect - h).abs().max() <= TOL


@pytest.mark.parametrize("channel_alpha", [False, True], ids=["alpha-head", "alpha-channel"])
@pytest.mark.parametrize("length", [16, 11], ids=["at-boundary", "3-pending"])
def test_reset_rows_restart_from_initial_state(length, channel_alpha):
    """reset_state between calls: the row restarts exactly as a fresh stream (its pending tokens dropped, its
    memory chunks from the next token, zero conv tail); the other row continues untouched."""
    layer = make_layer(channel_alpha=channel_alpha)
    x = torch.randn(2, length, 24, dtype=torch.float64)
    nxt = torch.randn(2, 21, 24, dtype=torch.float64)
    _, state = layer(x)
    state = layer.reset_state(state, torch.tensor([True, False]))
    y, _ = layer(nxt, state)
    y_fresh, _ = layer(nxt[:1])
    _, s_keep = layer(x)
    y_keep, _ = layer(nxt, s_keep)
    assert (y[0] - y_fresh[0]).abs().max() <= TOL  # row 0 forgot everything
    assert (y[1] - y_keep[1]).abs().max() <= TOL  # row 1 is untouched


# Document starts per row (B = 2, T = 45, memory chunk 8): at 0, mid-chunk, adjacent, at the last token, none.
DOC_STARTS = {"mixed": ([0, 5, 6, 30], [19]), "last-and-none": ([44], []), "many": (list(range(2, 45, 7)), [1, 2, 3])}


def doc_reset(rows, T=45) -> torch.Tensor:
    out = torch.zeros(len(rows), T, dtype=torch.bool)
    for r, pos in enumerate(rows):
        out[r, pos] = True
    return out


def each_document_alone(layer, x, reset):
    """The reference: every document of every row through the layer alone from a fresh state, put back in place."""
    rows = []
    for r in range(x.shape[0]):
        cuts = [0] + [t for t in torch.nonzero(reset[r]).flatten().tolist() if t > 0] + [x.shape[1]]
        rows.append(torch.cat([layer(x[r : r + 1, a:b])[0] for a, b in zip(cuts[:-1], cuts[1:])], dim=1))
    return torch.cat(rows)


def grads_of(layer, y):
    cot = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    return dict(zip([n for n, _ in layer.named_parameters()], torch.autograd.grad((y * cot).sum(), list(layer.parameters()))))


@pytest.mark.parametrize("kw", [{}, {"per_layer_theta": True, "depth": 1}, {"channel_alpha": True},
                                {"forget_target": "initial", "alpha_bias": -2.0}],
                         ids=["default", "linear-per-layer-theta", "alpha-channel", "forget-to-initial"])
@pytest.mark.parametrize("case", list(DOC_STARTS))
def test_packed_documents_equal_each_document_alone(case, kw):
    """A row of several documents with `reset` == each document alone from the initial state: outputs and the
    gradient of every parameter (W_0 included), float64."""
    layer = make_layer(**kw)
    x = torch.randn(2, 45, 24, dtype=torch.float64)
    reset = doc_reset(DOC_STARTS[case])
    y, _ = layer(x, reset=reset)
    ref = each_document_alone(layer, x, reset)
    assert (y - ref).abs().max() <= TOL
    g, g_ref = grads_of(layer, y), grads_of(layer, ref)
    for name in g:
        assert g_ref[name].abs().max() > 0, name
        assert (g[name] - g_ref[name]).abs().max() <= TOL, name


@pytest.mark.parametrize("forget_target", ["zero", "initial"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_documents_in_pieces_equal_one_call(seed, forget_target):
    """Streaming stays exact with document starts: pieces of random sizes (resets sliced with them) == one call,
    outputs and the final state, also when the rows' memory chunks are out of step (`pending_len`)."""
    layer = make_layer(forget_target=forget_target)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 45, 24, dtype=torch.float64, generator=gen)
    reset = doc_reset(DOC_STARTS["mixed"])
    y_full, s_full = layer(x, reset=reset)
    ys, state, pos = [], None, 0
    for n in random_split(45, gen):
        y, state = layer(x[:, pos : pos + n], state, reset[:, pos : pos + n])
        ys.append(y)
        pos += n
    assert (torch.cat(ys, dim=1) - y_full).abs().max() <= TOL
    w, w_full = layer.current_weights(state), layer.current_weights(s_full)
    assert all((a - b).abs().max() <= TOL for a, b in zip(w, w_full))
    probe = torch.randn(2, 9, 24, dtype=torch.float64, generator=gen)
    assert (layer(probe, state)[0] - layer(probe, s_full)[0]).abs().max() <= TOL


def test_retrieve_reads_the_initial_memory_after_a_document_start():
    layer = make_layer()
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    probe = torch.randn(2, 6, 24, dtype=torch.float64)
    _, state = layer(x)
    reset = torch.zeros(2, 6, dtype=torch.bool)
    reset[0, 2] = True
    h, after = layer.retrieve(probe, state, reset)
    h_old, _ = layer.retrieve(probe, state)
    h_fresh, _ = layer.retrieve(probe[:1, 2:])
    assert (h[0, :2] - h_old[0, :2]).abs().max() <= TOL and (h[1] - h_old[1]).abs().max() <= TOL
    assert (h[0, 2:] - h_fresh[0]).abs().max() <= TOL
    assert torch.equal(layer.current_weights(after)[0][0], layer.init_weights[0])


def test_gradients_reach_every_parameter_and_state():
    layer = make_layer()
    x = torch.randn(2, 20, 24, dtype=torch.float64, requires_grad=True)
    y, state = layer(x)
    (y.pow(2).sum() + sum(w.sum() for w in state.weights)).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_detach_cuts_the_graph():
    layer = make_layer()
    x = torch.randn(1, 10, 24, dtype=torch.float64)
    _, state = layer(x)
    d = state.detach()
    assert state.weights[0].requires_grad and not d.weights[0].requires_grad
    assert d.tokens_in_chunk == 2


def test_channel_alpha_rates():
    """channel_alpha: the rate map emits [theta | eta | alpha x head_dim] per head, every alpha with the same bias,
    and the streaming state carries (B, H, n, D) pending alphas."""
    layer = NeuralMemory(dim=24, heads=3, chunk_size=8, channel_alpha=True, eta_bias=1.5, alpha_bias=-4.0)
    assert layer.rates.out_features == 3 * (1 + 1 + 8)
    bias = layer.rates.bias.view(3, 10)
    assert torch.equal(bias[:, 1], torch.full((3,), 1.5)) and torch.equal(bias[:, 2:], torch.full((3, 8), -4.0))
    _, state = layer(torch.randn(2, 11, 24))
    assert state.pending[4].shape == (2, 3, 3, 8) and state.tokens_in_chunk == 3
    assert layer.init_state(2).pending[4].shape == (2, 3, 0, 8)
    n_scalar = sum(p.numel() for p in NeuralMemory(dim=24, heads=3).parameters())
    assert sum(p.numel() for p in layer.parameters()) == n_scalar + 3 * 7 * (24 + 1)  # 7 more rates per head


def test_ema_momentum_scales_theta_by_one_minus_eta():
    """momentum_form="ema": the op gets theta * (1 - eta), so S_t = eta S_(t-1) - (1 - eta) theta grad_t."""
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    plain, ema = make_layer(momentum_form="plain"), make_layer()  # ema is the default
    theta_p, eta_p, alpha_p = plain._rates(x)
    theta_e, eta_e, alpha_e = ema._rates(x)
    assert torch.equal(eta_p, eta_e) and torch.equal(alpha_p, alpha_e)
    assert torch.allclose(theta_e, theta_p * (1 - eta_p)[..., None], atol=0, rtol=1e-15)
    out, state = ema(x)
    out2, _ = ema(x[:, 7:], ema(x[:, :7])[1])  # streaming keeps the scaled rates in the pending tokens
    assert (out[:, 7:] - out2).abs().max() <= TOL


def test_bad_config():
    with pytest.raises(ValueError, match="momentum_form"):
        NeuralMemory(16, 2, momentum_form="nesterov")
    with pytest.raises(ValueError, match="depth"):
        NeuralMemory(16, 2, depth=0)
    with pytest.raises(ValueError, match="chunk_size"):
        NeuralMemory(16, 2, chunk_size=0)
    with pytest.raises(ValueError, match="ln_eps"):
        NeuralMemory(16, 2, ln_eps=0.0)
    with pytest.raises(ValueError, match="forget_target"):
        NeuralMemory(16, 2, forget_target="init")


def test_bf16_autocast_runs_with_fp32_memory():
    """Mixed precision: projections in bf16, the memory op in fp32, gradients finite (CPU autocast)."""
    torch.manual_seed(0)
    layer = NeuralMemory(dim=32, heads=2, chunk_size=4)
    x = torch.randn(2, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x)
        y2, _ = layer(x[:, :3], state)  # and streaming with pending tokens
    assert state.weights[0].dtype == torch.float32 and torch.isfinite(y.float()).all()
    (y.float().square().mean() + y2.float().square().mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    y32, _ = layer(x)
    assert (y.float() - y32).abs().max() < 0.1  # bf16 projections, fp32 memory: close to full fp32


def test_forgetting_to_zero_empties_the_memory_for_good():
    """Why `forget_target="initial"` exists: under a strong gate (alpha ~0.06, as the outer loop learns on some
    tokens) a long stream decays a bias-free memory MLP to zero, where each layer's inner gradient (a product with
    the other layer's weights) vanishes, so no later token can write it again; forgetting to W_0 keeps it usable."""
    x = torch.randn(1, 1024, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    norms = {}
    for target in ("zero", "initial"):
        layer = make_layer(forget_target=target, alpha_bias=-2.75)
        with torch.no_grad():
            _, state = layer(x)
            w0 = layer.init_state(1).weights
            norms[target] = [(w.norm() / w_init.norm()).item() for w, w_init in zip(state.weights, w0)]
    assert max(norms["zero"]) < 1e-12, norms
    assert min(norms["initial"]) > 0.3, norms
