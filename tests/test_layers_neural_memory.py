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


@pytest.mark.parametrize("per_layer_theta", [False, True], ids=["theta-shared", "theta-per-layer"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pieces_of_random_sizes_equal_one_call(seed, per_layer_theta):
    layer = make_layer(per_layer_theta=per_layer_theta)
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


def test_token_by_token_equals_one_call():
    layer = make_layer(chunk_size=4)
    x = torch.randn(1, 19, 24, dtype=torch.float64)
    y_full, _ = layer(x)
    state, ys = None, []
    for t in range(19):
        y, state = layer(x[:, t : t + 1], state)
        ys.append(y)
    assert (torch.cat(ys, 1) - y_full).abs().max() <= TOL


def test_layer_matches_reference_op():
    """The layer's memory read-out is the reference op applied to its own projections."""
    layer = make_layer()
    x = torch.randn(2, 21, 24, dtype=torch.float64)
    out, _ = layer(x)
    # Recompute projections as the layer does and run the token-loop reference.
    qkv, _ = layer._causal_conv(layer.qkv(x), layer.init_state(2).conv_tail, slice(None))
    q, k, v = (layer._heads(t) for t in F.silu(qkv).split(24, dim=-1))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    theta, eta, alpha = layer._rates(x)
    s0 = layer.init_state(2)
    y_ref, _, _ = memory_update_reference(q, k, v, theta[..., 0], eta, alpha, s0.weights, s0.momentum, chunk_size=8)
    assert (layer._output(y_ref, x) - out).abs().max() <= TOL


def test_retrieve_reads_current_weights_without_writing():
    layer = make_layer()
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
    q = F.normalize(layer._heads(F.silu(q)), dim=-1)
    expect = layer._output(memory_apply(q, w_now), probe)
    assert (expect - h).abs().max() <= TOL


def test_reset_rows_restart_from_initial_state():
    layer = make_layer()
    x = torch.randn(2, 16, 24, dtype=torch.float64)
    nxt = torch.randn(2, 8, 24, dtype=torch.float64)
    _, state = layer(x)
    state = layer.reset_state(state, torch.tensor([True, False]))
    y, _ = layer(nxt, state)
    y_fresh, _ = layer(nxt[:1])
    _, s_keep = layer(x)
    y_keep, _ = layer(nxt, s_keep)
    assert (y[0] - y_fresh[0]).abs().max() <= TOL  # row 0 forgot everything
    assert (y[1] - y_keep[1]).abs().max() <= TOL  # row 1 is untouched


def test_reset_with_pending_tokens_makes_them_no_ops():
    layer = make_layer(conv_kernel=1)  # no conv memory: the reset row must then equal a fresh start exactly
    x = torch.randn(2, 11, 24, dtype=torch.float64)  # 3 tokens pending
    _, state = layer(x)
    state = layer.reset_state(state, torch.tensor([True, False]))
    assert torch.equal(layer.current_weights(state)[0][0], state.weights[0][0])


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


def test_bad_config():
    with pytest.raises(ValueError, match="depth"):
        NeuralMemory(16, 2, depth=0)
    with pytest.raises(ValueError, match="chunk_size"):
        NeuralMemory(16, 2, chunk_size=0)


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
