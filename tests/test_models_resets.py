"""Document starts inside a sequence chunk (`model(tokens, state, reset)`) against running each document alone.

LMM: the whole model on each document alone from a fresh state, concatenated, equals the packed call with resets
(logits and the gradient of every parameter, float64). MAG / MAL: their sliding-window attention is not reset (packed
training without document masks), so the reference runs the same packed model with every memory layer fed each
document alone from its initial state. MAC: its attention spans a segment, so a packed row equals its documents
alone (each from a fresh state at its stream position) when they start at segment boundaries; mid-segment the segment's attention (and memory tokens) span the
start, while both memories restart at the exact token (tested at the layer: `retrieve`, `forward`).
Pieces with the state carried equal one call with resets, for every variant.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from test_models_streaming import make, random_split, tokens

TOL = 1e-9
T = 37  # not a multiple of the memory chunk (4), window (6) or MAC segment (8)
# per row: document starts at 0, mid-chunk, adjacent, at the last token; the other row one start / none
STARTS = {"mixed": ([0, 5, 6, 21], [14]), "last-and-none": ([36], [])}


def reset_mask(rows, length=T) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.bool)
    for r, pos in enumerate(rows):
        out[r, pos] = True
    return out


def documents(reset_row: torch.Tensor) -> list[tuple[int, int]]:
    cuts = [0] + [t for t in torch.nonzero(reset_row).flatten().tolist() if t > 0] + [reset_row.shape[0]]
    return list(zip(cuts[:-1], cuts[1:]))


class EachDocumentAlone(nn.Module):
    """Reference memory for one call from a fresh state: the wrapped NeuralMemory on each document of each row
    alone from its initial state (the layer without resets), outputs put back in place."""

    def __init__(self, memory, reset):
        super().__init__()
        self.memory, self.reset = memory, reset

    def init_state(self, *args, **kwargs):
        return self.memory.init_state(*args, **kwargs)

    def forward(self, x, state, reset=None):
        assert reset is not None and x.shape[1] == self.reset.shape[1], "reference is for one full call"
        rows = [torch.cat([self.memory(x[r : r + 1, a:b])[0] for a, b in documents(self.reset[r])], dim=1)
                for r in range(x.shape[0])]
        return torch.cat(rows), state


def grads(model, logits):
    cot = torch.cos(torch.arange(logits.numel(), dtype=logits.dtype)).view_as(logits)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad((logits * cot).sum(), params, allow_unused=True)


def assert_close(model, logits, ref):
    assert (logits - ref).abs().max() <= TOL
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    g_packed, g_ref = grads(model, logits), grads(model, ref)
    for name, g, r in zip(names, g_packed, g_ref):
        if r is None:
            assert g is None, name
            continue
        assert (g - r).abs().max() <= TOL, name
    assert any(r is not None and r.abs().max() > 0 and "init_weights" in n for n, r in zip(names, g_ref))


@pytest.mark.parametrize("case", list(STARTS))
def test_lmm_packed_documents_equal_each_document_alone(case):
    model = make("lmm")
    toks, reset = tokens(), reset_mask(STARTS[case])
    logits, _ = model(toks, reset=reset)
    ref = torch.cat([torch.cat([model(toks[r : r + 1, a:b])[0] for a, b in documents(reset[r])], dim=1)
                     for r in range(toks.shape[0])])
    assert_close(model, logits, ref)


@pytest.mark.parametrize("case", list(STARTS))
@pytest.mark.parametrize("variant", ["mag", "mal"])
def test_hybrid_memory_equals_each_document_alone(variant, case):
    model = make(variant)
    toks, reset = tokens(), reset_mask(STARTS[case])
    logits, _ = model(toks, reset=reset)
    memories = [block.memory for block in model.blocks]
    for block in model.blocks:
        block.memory = EachDocumentAlone(block.memory, reset)
    try:
        ref, _ = model(toks, reset=reset)
    finally:
        for block, memory in zip(model.blocks, memories):
            block.memory = memory
    assert_close(model, logits, ref)


def test_mac_documents_at_segment_boundaries_equal_each_document_alone():
    """Each document alone from a fresh state at its stream position: positions are not reset (queries attend to
    the persistent tokens, which have no RoPE, so attention depends on the absolute position)."""
    model = make("mac")  # segment_len 8
    toks = tokens(length=36)
    reset = reset_mask(([0, 8, 24], [16]), length=36)
    logits, _ = model(toks, reset=reset)
    alone = lambda r, a, b: model(toks[r : r + 1, a:b], dataclasses.replace(model.init_state(1), pos=a))[0]  # noqa: E731
    ref = torch.cat([torch.cat([alone(r, a, b) for a, b in documents(reset[r])], dim=1) for r in range(2)])
    assert_close(model, logits, ref)


@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal", "transformer"])
def test_documents_in_pieces_equal_one_call(variant):
    model = make(variant)
    toks, reset = tokens(), reset_mask(STARTS["mixed"])
    full, _ = model(toks, reset=reset)
    state, outs, pos = None, [], 0
    for n in random_split(T, seed=3):
        logits, state = model(toks[:, pos : pos + n], state, reset[:, pos : pos + n])
        outs.append(logits)
        pos += n
    assert (torch.cat(outs, dim=1) - full).abs().max() <= TOL


def test_bad_reset_shape():
    model = make("lmm")
    with pytest.raises(ValueError, match="reset.shape"):
        model(tokens(), reset=torch.zeros(2, T + 1, dtype=torch.bool))
