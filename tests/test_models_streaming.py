"""The five networks: pieces with the state carried == one call, token-by-token generation == full forward,
causality (MAC's memory tokens included), gradients reach every parameter, the State API."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from titans_train.config import ModelConfig
from titans_train.models import State, build_model

VARIANTS = ["lmm", "mac", "mac_paper_product", "mag", "mal", "transformer"]
TOL = 1e-8  # float64, the bound
T = 37  # not a multiple of the memory chunk (4), the window (6) or the MAC segment (8)


def tiny(variant: str, **over) -> ModelConfig:
    kw = dict(variant=variant, vocab_size=61, dim=32, n_layers=2, heads=4, max_seq_len=64, window=6,
              n_persistent=3, segment_len=8, mac_memory_tokens=4, memory=dict(chunk_size=4))
    if variant == "transformer":
        kw.update(window=None, n_persistent=0)
    if variant == "mac_paper_product":  # MAC combining y and the memory as the paper does, y * g(o)
        kw.update(variant="mac", mac_output_norm=False)
    kw.update(over)
    return ModelConfig(**kw)


def make(variant: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    model = build_model(tiny(variant, **over)).double()
    # Non-trivial values everywhere (identity convs and zero-ish rates would hide mistakes).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv" in name or "rates" in name or "out_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(batch=2, length=T, seed=1, vocab=61):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def run_pieces(model, toks, sizes):
    state, outs, pos = None, [], 0
    for size in sizes:
        logits, state = model(toks[:, pos:pos + size], state)
        outs.append(logits)
        pos += size
    assert pos == toks.shape[1]
    return torch.cat(outs, dim=1), state


def random_split(total: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    sizes, left = [], total
    while left:
        s = min(left, int(torch.randint(1, 12, (1,), generator=g)))
        sizes.append(s)
        left -= s
    return sizes


@pytest.mark.parametrize("variant", VARIANTS)
def test_pieces_with_state_equal_one_call(variant):
    model = make(variant)
    toks = tokens()
    full, state_full = model(toks)
    splits = [random_split(T, s) for s in range(3)]
    if variant.startswith("mac"):
        splits.append([8, 16, 8, 5])  # on segment boundaries (what the issue requires); the others need not be
    for sizes in splits:
        pieces, state = run_pieces(model, toks, sizes)
        assert (pieces - full).abs().max() <= TOL, sizes
        assert state.pos == state_full.pos == T
        a, b = state.state_dict(), state_full.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].shape == b[key].shape, key
                assert a[key].numel() == 0 or (a[key] - b[key]).abs().max() <= TOL, key


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_channel_alpha_pieces_and_generation(variant):
    """`memory.channel_alpha`: pieces with state == one call, and generation == full forward (the (B, H, n, D)
    pending alphas are carried and replayed)."""
    model = make(variant, memory=dict(chunk_size=4, channel_alpha=True))
    toks = tokens()
    full, _ = model(toks)
    pieces, _ = run_pieces(model, toks, random_split(T, 0))
    assert (pieces - full).abs().max() <= TOL
    out, logits = model.generate(toks[:, :5], max_new_tokens=9, temperature=0.0, return_logits=True)
    full, _ = model(out[:, :-1])
    assert (full[:, 4:] - logits).abs().max() <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_generation_logits_equal_full_forward(variant):
    model = make(variant)
    prompt = tokens(length=5)
    out, logits = model.generate(prompt, max_new_tokens=24, temperature=0.0, return_logits=True)
    assert out.shape == (2, 29) and logits.shape == (2, 24, 61)
    full, _ = model(out[:, :-1])
    assert (full[:, 4:] - logits).abs().max() <= TOL
    assert torch.equal(out[:, 5:], full[:, 4:].argmax(-1))
    sampled = model.generate(prompt, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :5], prompt)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_token_sees_its_future(variant):
    model = make(variant)
    toks = tokens(length=24)
    base, _ = model(toks)
    # 9 and 17 are the second token of a MAC memory-token group (stride 2): a wrong visibility rule leaks there.
    for p in (1, 9, 12, 17, 23):
        changed = toks.clone()
        changed[:, p] = (changed[:, p] + 1) % 61
        logits, _ = model(changed)
        assert (logits[:, :p] - base[:, :p]).abs().max() == 0, p
        assert (logits[:, p] - base[:, p]).abs().max() > 0, p


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    model = build_model(tiny(variant, vocab_size=16))
    toks = torch.randint(0, 16, (2, 33))
    state = None
    loss = 0
    for lo, hi in ((0, 20), (20, 33)):  # two calls: gradients also flow through the carried state
        logits, state = model(toks[:, lo:hi], state)
        loss = loss + F.cross_entropy(logits.flatten(0, 1), toks[:, lo:hi].roll(-1, 1).flatten())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_state_detach_to_state_dict_and_reset():
    model = make("mac")
    toks = tokens(length=13)
    model.float()
    _, state = model(toks.clone())
    assert isinstance(state, State) and state.pos == 13
    detached = state.detach()
    assert all(not t.requires_grad for t in detached.state_dict().values() if isinstance(t, torch.Tensor))
    doubled = state.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in doubled.state_dict().values() if isinstance(t, torch.Tensor)
               and t.is_floating_point())
    assert "pos" in state.state_dict() and "_model" not in state.state_dict()
    # Resetting row 0 gives row 0 the memory of a fresh stream; row 1 is untouched.
    reset = state.reset(torch.tensor([True, False]))
    fresh = model.init_state(2)
    m_reset, m_old, m_fresh = reset.layers[0].memory, state.layers[0].memory, fresh.layers[0].memory
    assert torch.equal(m_reset.weights[0][0], m_fresh.weights[0][0])
    assert torch.equal(m_reset.weights[0][1], m_old.weights[0][1])
    assert not torch.equal(m_old.weights[0][0], m_fresh.weights[0][0])


def test_mac_memory_tokens_enter_attention():
    """The memory tokens change MAC's output (the retrieval path is not dead code)."""
    model = make("mac")
    toks = tokens(length=24)
    base, _ = model(toks)
    other = make("mac", mac_memory_pool="last")
    other.load_state_dict(model.state_dict())
    changed, _ = other(toks)
    assert (changed - base).abs().max() > 1e-6


@pytest.mark.parametrize("output_norm", [False, True])
def test_mac_output_norm_makes_the_block_invariant_to_the_attention_scale(output_norm):
    """`mac_output_norm`: out = norm(y) * g(norm(o)) with the memory written from norm(y), so scaling the attention
    output projection changes nothing; the paper's bare product y * g(o) scales with it."""
    model = make("mac", mac_output_norm=output_norm, norm_eps=1e-30)  # y is small at init: eps would show
    toks = tokens(length=20)
    base, _ = model(toks)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.wo.weight.mul_(7.0)
    scaled, _ = model(toks)
    diff = (scaled - base).abs().max()
    assert diff <= 1e-9 if output_norm else diff > 1e-3


def test_build_model_from_mapping_and_unknown_variant():
    model = build_model(dataclasses.asdict(tiny("mag")))
    assert model.cfg.variant == "mag"
    with pytest.raises(ValueError, match="choose one of lmm, mac, mag, mal, transformer"):
        build_model({**dataclasses.asdict(tiny("mag")), "variant": "rwkv"})
