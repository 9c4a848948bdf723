"""Scoring a long token stream through the model's state, one bounded piece at a time.

The model is called on pieces of at most `piece_len` tokens with its state carried, which equals one call over
the whole stream (DESIGN.md, State); so cost is linear in the length and memory is bounded by the piece, never a
(T, vocab) or (T,) logits tensor for the whole stream. `reset_every` starts a fresh state every that many tokens:
the same targets scored in isolated windows (what a model without carried state would see).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F


def token_nll(model, ids: np.ndarray | torch.Tensor, piece_len: int = 1024,
              reset_every: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """For ids (T + 1,), yield (start, nll) per piece: nll (t,) float64 is -log p(ids[i + 1] | ids[:i + 1]) for
    i in start .. start + t - 1 (with the state reset at multiples of `reset_every`, when given)."""
    if piece_len < 1:
        raise ValueError(f"piece_len={piece_len} must be >= 1")
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64) if not torch.is_tensor(ids) else ids, dtype=torch.long)
    device = next(model.parameters()).device
    T = ids.numel() - 1
    state, start = None, 0
    with torch.no_grad():
        while start < T:
            stop = min(start + piece_len, T)
            if reset_every:
                if start % reset_every == 0:
                    state = None
                stop = min(stop, (start // reset_every + 1) * reset_every)  # a piece never crosses a reset
            x = ids[start:stop].to(device)[None]  # (1, t)
            logits, state = model(x, state)
            nll = F.cross_entropy(logits[0].double(), ids[start + 1: stop + 1].to(device), reduction="none")
            yield start, nll.cpu()
            start = stop
