"""Truncated backprop through memory over one window of sequence chunks.

A window is `n_chunks` consecutive sequence chunks of `chunk_len` tokens from one stream (DESIGN.md, "Words").
The model's state (memory fast weights, momentum, attention caches) rides across the chunks. Every
`tbptt_chunks` chunks we call backward on the loss accumulated since the last truncation point and detach the
state, so activation memory is bounded by `tbptt_chunks * chunk_len` tokens however long the window is.

With `tbptt_chunks == n_chunks` this is exact backprop through the whole window (the model's streaming
equivalence: pieces with the state carried == one call). With fewer, the gradient of each segment treats its
incoming state as a constant, which is the usual truncated-BPTT approximation.

Kept free of Lightning so that the test can compare it against hand-written references.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def window_step(
    model: Callable[..., tuple[Tensor, Any]],
    tokens: Tensor,
    doc_start: Tensor | None,
    *,
    chunk_len: int,
    tbptt_chunks: int,
    backward: Callable[[Tensor], None] | None,
    scale: float = 1.0,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
    sync_last: bool = True,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    reset_memory: str = "token",
) -> Tensor:
    """Forward (and backward, unless `backward` is None) over one window; returns the loss of each chunk.

    Args:
        model: `model(tokens (B, T), state, reset (B, T) bool) -> (logits (B, T, V), state)` (`reset` only with
            reset_memory="token").
        tokens: (B, n_chunks * chunk_len + 1) token ids; inputs are `tokens[:, :-1]`, targets `tokens[:, 1:]`.
        doc_start: (B, n_chunks * chunk_len + 1) bool, True where a document starts, or None.
        chunk_len: tokens per sequence chunk.
        tbptt_chunks: backward and detach the state every this many chunks (clamped to n_chunks).
        backward: called with each truncation segment's loss (e.g. `LightningModule.manual_backward`).
        scale: multiplies the loss given to `backward` (1 / gradient-accumulation windows).
        no_sync: context in which the non-final backwards run (DDP: no gradient all-reduce there).
        sync_last: whether the window's final backward synchronises (False for a non-final accumulation
            window).
        autocast: context for the forward (bf16 autocast on GPU).
        reset_memory: "token": pass each chunk's document starts to the model (its memory restarts at the exact
            token); "chunk": reset a row's state before a chunk whose first token starts a document; "none".

    Returns:
        (n_chunks,) detached (fp32 or fp64) mean cross-entropy of each chunk. The window loss given to `backward`
        is the mean over all tokens of the window, i.e. the mean of these, times `scale`.
    """
    if reset_memory not in ("token", "chunk", "none"):
        raise ValueError(f"reset_memory must be 'token', 'chunk' or 'none', got {reset_memory!r}")
    B, L1 = tokens.shape
    if (L1 - 1) % chunk_len != 0:
        raise ValueError(f"window length {L1 - 1} (tokens.shape[1] - 1) is not a multiple of chunk_len={chunk_len}")
    n_chunks = (L1 - 1) // chunk_len
    k = max(1, min(tbptt_chunks, n_chunks))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    state = None
    pending: Tensor | None = None  # loss accumulated since the last truncation point
    losses = []
    for c in range(n_chunks):
        lo, hi = c * chunk_len, (c + 1) * chunk_len
        kw = {}
        if reset_memory == "token" and doc_start is not None:
            kw["reset"] = doc_start[:, lo:hi]
            if c == 0:  # the window starts from a fresh state anyway
                kw["reset"] = torch.cat([torch.zeros_like(kw["reset"][:, :1]), kw["reset"][:, 1:]], dim=1)
        if c > 0 and reset_memory == "chunk" and doc_start is not None and state is not None:
            state = reset_rows(model, state, doc_start[:, lo])
        with autocast():
            logits, state = model(inputs[:, lo:hi], state, **kw)  # (B, T, V)
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()  # cross-entropy in fp32 under bf16 autocast
        loss = F.cross_entropy(logits.flatten(0, 1), targets[:, lo:hi].flatten())
        losses.append(loss.detach())
        pending = loss if pending is None else pending + loss
        last = c == n_chunks - 1
        if (c + 1) % k == 0 or last:
            if backward is not None:
                with (nullcontext() if (last and sync_last) else no_sync()):
                    backward(pending * (scale / n_chunks))
            pending = None
            if not last and state is not None:
                state = detach_state(state)
    return torch.stack(losses)


def detach_state(state: Any) -> Any:
    """`state.detach()` where the state provides it, else detach every tensor in a (nested) container."""
    if hasattr(state, "detach"):
        return state.detach()
    return _tree_map(lambda t: t.detach(), state)


def reset_rows(model: Any, state: Any, rows: Tensor) -> Any:
    """Return `state` with the rows in the bool mask `rows` (B,) reset to a fresh state.

    Uses, in order: nothing when no row is set; `state.reset(rows)` if the state has it; `None` (a fresh
    state for all) when every row is set; otherwise a fresh state from `model.init_state(batch_size)` mixed in
    row-wise, which assumes batch-first tensors. Without `init_state`, partial resets are not possible and
    raise, rather than silently carry memory across documents.
    """
    if not bool(rows.any()):
        return state
    if hasattr(state, "reset"):
        return state.reset(rows)
    if bool(rows.all()):
        return None
    inner = getattr(model, "module", model)
    if not hasattr(inner, "init_state"):
        raise TypeError(
            f"{type(inner).__name__} cannot reset memory per row: its state needs reset(rows), "
            "or the model init_state(batch_size)"
        )
    fresh = inner.init_state(rows.shape[0])

    def mix(old: Tensor, new: Tensor) -> Tensor:
        m = rows.to(old.device).view(-1, *([1] * (old.dim() - 1)))
        return torch.where(m, new.to(old.dtype), old)

    return _tree_map2(mix, state, fresh)


def _tree_map(fn, x):
    if isinstance(x, Tensor):
        return fn(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _tree_map(fn, getattr(x, f.name)) for f in dataclasses.fields(x)})
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_map(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: _tree_map(fn, v) for k, v in x.items()}
    return x


def _tree_map2(fn, x, y):
    if isinstance(x, Tensor):
        return fn(x, y)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(
            x, **{f.name: _tree_map2(fn, getattr(x, f.name), getattr(y, f.name)) for f in dataclasses.fields(x)}
        )
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_map2(fn, a, b) for a, b in zip(x, y))
    if isinstance(x, dict):
        return {k: _tree_map2(fn, v, y[k]) for k, v in x.items()}
    return x
