"""Documents packed in one row (`memory_update(reset=, mask=)`) against running each document alone (float64).

The reference (`memory_update_reference` with the same arguments) cuts each row into its documents and runs each
one through the token loop from the initial state; the op lays them out in one padded chunked row and must give the
same outputs, final state and every gradient (the initial weights' included) on every implementation.
"""

from __future__ import annotations

import pytest
import torch

from titans_train.ops import memory_update, memory_update_reference
from titans_train.ops.neural_memory.documents import document_layout

from test_ops_memory import B, IMPLS, NAMES, TOL, _cpu_kernel, make_inputs

T = 37


def starts(*rows: list[int]) -> torch.Tensor:
    """(B, T) bool with True at the given positions of each row."""
    out = torch.zeros(len(rows), T, dtype=torch.bool)
    for r, pos in enumerate(rows):
        out[r, pos] = True
    return out


# row 0 / row 1 reset positions, chunk sizes 4 and 16 (some documents shorter than a chunk)
CASES = {
    "mid-chunk": ([5, 18], [9]),
    "at-0-and-adjacent": ([0, 1, 2, 30], [13, 14]),
    "last-token-and-none": ([36], []),
    "many-short": (list(range(3, 37, 3)), [0, 7, 8, 20, 35]),
}


def compare(reset, mask, chunk_size, impl, n_layers=2, channel_alpha=False, forget_to=False):
    if impl == "cpu":
        _cpu_kernel()
    args, leaves = make_inputs(T, n_layers, channel_alpha=channel_alpha)
    W0 = tuple((0.9 * w).detach().requires_grad_(True) for w in args[6])  # the initial state differs from W
    kw = dict(chunk_size=chunk_size, reset=reset, mask=mask, initial=W0)
    if forget_to:  # the layer's use: forget back to W_0, the state every document starts from
        kw["forget_to"] = W0
    outs = {}
    for name, fn, extra in (("fast", memory_update, {"impl": impl}), ("ref", memory_update_reference, {})):
        y, W, S = fn(*args, **kw, **extra)
        cot = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
        loss = (y * cot).sum() + sum((w * w).sum() for w in W) + sum(1.3 * s.sum() for s in S)
        outs[name] = (y, W, S, torch.autograd.grad(loss, leaves + list(W0)))
    fast, ref = outs["fast"], outs["ref"]
    errors = {"y": (fast[0] - ref[0]).abs().max().item()}
    for i in range(n_layers):
        errors[f"weights_out[{i}]"] = (fast[1][i] - ref[1][i]).abs().max().item()
        errors[f"momentum_out[{i}]"] = (fast[2][i] - ref[2][i]).abs().max().item()
    names = NAMES + [f"{p}[{i}]" for p in ("weights", "momentum", "initial") for i in range(n_layers)]
    for name, gf, gr in zip(names, fast[3], ref[3]):
        errors[f"grad {name}"] = (gf - gr).abs().max().item()
        assert torch.isfinite(gr).all() and gr.abs().max() > 0, name
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"max abs errors above {TOL}: {bad}"
    return fast


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [4, 16], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("case", list(CASES))
def test_packed_documents_match_each_alone(case, chunk_size, impl):
    compare(starts(*CASES[case]), None, chunk_size, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_absent_tokens(impl):
    """Absent tokens (leading, inside a document, a whole row but one token) are skipped; resets on them ignored."""
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :6] = False
    mask[0, 20:23] = False
    mask[1, :36] = False
    y = compare(starts([3, 10, 21], [4]), mask, 4, impl)[0]
    assert (y[0, :, :6] == 0).all() and (y[1, :, :36] == 0).all()


def test_channel_alpha_documents():
    compare(starts(*CASES["mid-chunk"]), None, 4, "autograd", channel_alpha=True)


def test_no_reset_and_full_mask_equal_the_plain_op():
    """reset all False / mask all True lay the row out unchanged: the plain op's numbers."""
    args, _ = make_inputs(T, 2)
    plain = memory_update(*args, chunk_size=4)
    none = torch.zeros(B, T, dtype=torch.bool)
    packed = memory_update(*args, chunk_size=4, reset=none, mask=~none, initial=args[6])
    for a, b in zip([plain[0], *plain[1], *plain[2]], [packed[0], *packed[1], *packed[2]]):
        assert (a - b).abs().max().item() <= TOL


def test_layout():
    """Each document starts on a chunk boundary; fillers hand the state on (-1); a reset marks its chunk."""
    reset = starts([2, 3], [])[:, :8]
    lay = document_layout(reset, None, 4)
    # row 0: doc0 = tokens 0-1 (chunk 0), doc1 = token 2 (chunk 1), doc2 = tokens 3-7 (chunks 2, 3)
    assert lay.n_chunks == 4
    assert lay.slot[0].tolist() == [0, 1, 4, 8, 9, 10, 11, 12]
    assert lay.reset[0].tolist() == [False, True, True, False]
    assert lay.last[0].tolist() == [1, 0, 3, 0]
    assert lay.slot[1].tolist() == list(range(8)) and lay.last[1].tolist() == [3, 3, -1, -1]
    assert lay.source[0, :5].tolist() == [0, 1, -1, -1, 2]


def test_bad_reset_names_the_argument():
    args, _ = make_inputs(T, 2)
    with pytest.raises(ValueError, match="reset must be a"):
        memory_update(*args, reset=torch.zeros(B, T + 1, dtype=torch.bool), initial=args[6])
    with pytest.raises(ValueError, match="reset needs initial"):
        memory_update(*args, reset=torch.zeros(B, T, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"initial\[1\].shape"):
        memory_update(*args, reset=torch.zeros(B, T, dtype=torch.bool), initial=(args[6][0], args[6][0]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [4, 16], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("case", ["mid-chunk", "many-short"])
def test_documents_forgetting_to_the_initial_weights(case, chunk_size, impl):
    """Packed documents with the gate decaying to W_0 (the layer's `forget_target="initial"`): padding and the
    chunks without a real token leave the state alone, and the gradient of W_0 sums its two roles."""
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 20:23] = False
    compare(starts(*CASES[case]), mask, chunk_size, impl, forget_to=True)
