"""A tiny recurrent LM with a typed, carried state: stands in for a Titans model in the training tests.

It has the Titans model interface (`model(tokens, state) -> (logits, state)`, a State with `detach()`), and
pieces-with-state equals one call exactly, which is all truncated backprop relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ToyState:
    h: torch.Tensor  # (B, D)

    def detach(self) -> "ToyState":
        return ToyState(self.h.detach())


class ToyLM(nn.Module):
    def __init__(self, vocab: int = 17, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rec = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.dim = dim

    def init_state(self, batch: int) -> ToyState:
        return ToyState(torch.zeros(batch, self.dim, dtype=self.emb.weight.dtype, device=self.emb.weight.device))

    def forward(self, tokens, state=None):
        h = self.init_state(tokens.shape[0]).h if state is None else state.h
        x = self.emb(tokens)  # (B, T, D)
        outs = []
        for t in range(tokens.shape[1]):
            h = torch.tanh(self.rec(h) + x[:, t])
            outs.append(h)
        y = self.norm(torch.stack(outs, 1))  # (B, T, D)
        return self.head(y), ToyState(h)

    def flops_per_token(self, seq_len: int) -> int:
        return 6 * sum(p.numel() for p in self.parameters())
