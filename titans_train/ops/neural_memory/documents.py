"""Several documents packed in one row: the memory restarts from its initial state at each document's first token.

`memory_update(reset=..., mask=...)` means, per batch row: drop the absent tokens (mask False), cut what is left
into documents at the reset tokens, and run each document as if alone: its memory chunks start at its own first
token and its state starts at (initial weights, zero momentum). The tokens before the row's first reset continue
from the given state, as without resets.

How, exactly and on every implementation (CPU kernel, Triton kernels, autograd step) unchanged:
  * Layout (`document_layout`): per row, each document starts at a memory-chunk boundary of a padded row of
    N * chunk_size slots. The slots after a document's last token up to the next boundary are padding (zero
    q/k/v, theta 0, eta 1, alpha 0); they come after the document's real tokens, so no real token reads them (the
    dual form is causal), and the state after them is never used: a reset follows, or the chunk's end row stops
    before them. Rows with fewer chunks than the longest get filler chunks that hand the state on unchanged.
  * The chunk loop runs in ranges cut at the chunk indices where some row resets; between two ranges the
    resetting rows' state is replaced by the initial one (`torch.where`, so the gradient of every reset reaches
    `initial`). Inside a range it is the ordinary op, told each chunk's end row per batch row.
Cost: one op call per distinct reset chunk index (documents are thousands of tokens, so a few per sequence chunk)
and at most chunk_size - 1 padding slots per document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .chunk import memory_update_chunked


@dataclass
class DocumentLayout:
    """Where each token of a (B, T) row goes in the padded chunked layout of N * b slots per row."""

    slot: Tensor  # (B, T) long: slot of each present token, -1 for absent tokens
    source: Tensor  # (B, N * b) long: token in each slot, -1 for padding
    reset: Tensor  # (B, N) bool: the chunk is a document's first (its state starts at the initial state)
    last: Tensor  # (B, N) long: chunk-local row of the chunk's last token, -1 for a filler chunk
    n_chunks: int


def document_layout(reset: Tensor, mask: Tensor | None, chunk_size: int) -> DocumentLayout:
    """The padded layout of documents cut at `reset` (B, T) bool among the tokens where `mask` (B, T) is True."""
    B, T = reset.shape
    b, dev = chunk_size, reset.device
    present = torch.ones_like(reset) if mask is None else mask
    reset = reset & present
    doc = torch.cumsum(reset.long(), dim=1)  # (B, T) document of each token; 0 = the one carried in
    doc_len = torch.zeros(B, T + 1, dtype=torch.long, device=dev).scatter_add_(1, doc, present.long())
    doc_chunks = -(-doc_len // b)
    first_chunk = torch.cumsum(doc_chunks, dim=1) - doc_chunks  # (B, T + 1) exclusive cumsums
    first_token = torch.cumsum(doc_len, dim=1) - doc_len
    index = torch.cumsum(present.long(), dim=1) - 1  # (B, T) index among the row's present tokens
    slot = first_chunk.gather(1, doc) * b + index - first_token.gather(1, doc)
    slot = torch.where(present, slot, -1)
    N = int(doc_chunks.sum(dim=1).max())
    # Absent tokens write to a spare slot / chunk past the end, cut off after.
    where = torch.where(present, slot, N * b)
    source = torch.full((B, N * b + 1), -1, dtype=torch.long, device=dev)
    source.scatter_(1, where, torch.arange(T, device=dev).expand(B, T))
    chunk = where // b
    chunk_reset = torch.zeros(B, N + 1, dtype=torch.bool, device=dev).scatter_(1, torch.where(reset, chunk, N), True)
    last = torch.full((B, N + 1), -1, dtype=torch.long, device=dev)
    last.scatter_reduce_(1, chunk, torch.where(present, slot % b, -1), reduce="amax")
    return DocumentLayout(slot, source[:, : N * b], chunk_reset[:, :N], last[:, :N], N)


def scatter_tokens(x: Tensor, layout: DocumentLayout, fill: float = 0.0) -> Tensor:
    """(B, H, T, ...) per token -> (B, H, N * b, ...) per slot, padding slots = `fill`."""
    src = layout.source.view(x.shape[0], 1, -1, *([1] * (x.dim() - 3)))  # (B, 1, N * b, 1...)
    out = x.gather(2, src.clamp_min(0).expand(x.shape[0], x.shape[1], src.shape[2], *x.shape[3:]))
    return torch.where(src >= 0, out, fill)


def gather_tokens(y: Tensor, layout: DocumentLayout) -> Tensor:
    """(B, H, N * b, D) per slot -> (B, H, T, D) per token, 0 for absent tokens."""
    slot = layout.slot.view(y.shape[0], 1, -1, 1)  # (B, 1, T, 1)
    out = y.gather(2, slot.clamp_min(0).expand(y.shape[0], y.shape[1], slot.shape[2], y.shape[3]))
    return torch.where(slot >= 0, out, 0.0)


def memory_update_documents(q, k, v, theta, eta, alpha, weights, momentum, initial, reset, mask, *, chunk_size,
                            **kw) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """`memory_update_chunked` with documents (see the module docstring); theta (B, H, T, L), the rest validated."""
    b = chunk_size
    lay = document_layout(reset, mask, b)
    if lay.n_chunks == 0:  # no token present in any row
        return torch.zeros_like(q), tuple(weights), tuple(momentum)
    qp, kp, vp, thp, alp = (scatter_tokens(x, lay) for x in (q, k, v, theta, alpha))
    etp = scatter_tokens(eta, lay, 1.0)
    cuts = torch.nonzero(lay.reset.any(dim=0)).flatten().tolist()
    bounds = sorted({0, lay.n_chunks, *cuts})
    W, S, ys = tuple(weights), tuple(momentum), []
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        if c0 in cuts:  # the rows whose document starts at chunk c0 start from the initial state
            rows = lay.reset[:, c0].view(-1, 1, 1, 1)
            W = tuple(torch.where(rows, w0.to(w.dtype), w) for w0, w in zip(initial, W))
            S = tuple(torch.where(rows, 0.0, s) for s in S)
        t0, t1 = c0 * b, c1 * b
        y, W, S = memory_update_chunked(qp[:, :, t0:t1], kp[:, :, t0:t1], vp[:, :, t0:t1], thp[:, :, t0:t1],
                                        etp[:, :, t0:t1], alp[:, :, t0:t1], W, S, chunk_size=b,
                                        last=lay.last[:, c0:c1], **kw)
        ys.append(y)
    return gather_tokens(torch.cat(ys, dim=2) if len(ys) > 1 else ys[0], lay), W, S
