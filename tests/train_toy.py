"""A tiny recurrent LM with a typed, carried state: stands in for a Titans model in the training tests.

It has the Titans model interface (`model(tokens, state, reset) -> (logits, state)`, a State with `detach()`;
its recurrent state restarts from zero at each `reset` token, like a Titans memory at a document start), and
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

    def forward(self, tokens, state=None, reset=None):
        h = self.init_state(tokens.shape[0]).h if state is None else state.h
        x = self.emb(tokens)  # (B, T, D)
        outs = []
        for t in range(tokens.shape[1]):
            if reset is not None:
                h = torch.where(reset[:, t, None], torch.zeros_like(h), h)
            h = torch.tanh(self.rec(h) + x[:, t])
            outs.append(h)
        y = self.norm(torch.stack(outs, 1))  # (B, T, D)
        return self.head(y), ToyState(h)

    def flops_per_token(self, seq_len: int) -> int:
        return 6 * sum(p.numel() for p in self.parameters())


class _Windows(torch.utils.data.IterableDataset):
    """Deterministic windows of a repeating pattern plus noise, from batch index `start` on."""

    def __init__(self, dm: "ToyData", split: str):
        self.dm, self.split = dm, split

    def __iter__(self):
        dm = self.dm
        i = dm.consumed if self.split == "train" else 0
        while True:
            g = torch.Generator().manual_seed(dm.seed * 1000003 + i + (0 if self.split == "train" else 10**6))
            L = dm.n_chunks * dm.chunk_len + 1
            base = torch.arange(L).repeat(dm.batch_size, 1) % 5
            noise = torch.randint(0, dm.vocab, (dm.batch_size, L), generator=g)
            keep = torch.rand(dm.batch_size, L, generator=g) < 0.8
            tokens = torch.where(keep, base, noise)
            doc_start = torch.zeros_like(tokens, dtype=torch.bool)
            doc_start[:, 0] = True
            yield {"tokens": tokens, "doc_start": doc_start}
            i += 1


class ToyData(__import__("lightning").LightningDataModule):
    """Stands in for the real data module: batches of windows and an exact cursor of consumed batches."""

    def __init__(self, vocab=17, n_chunks=3, chunk_len=8, batch_size=4, seed=0):
        super().__init__()
        self.vocab, self.n_chunks, self.chunk_len, self.batch_size, self.seed = vocab, n_chunks, chunk_len, batch_size, seed
        self.consumed = 0

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Windows(self, "train"), batch_size=None)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(_Windows(self, "val"), batch_size=None)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is not None and self.trainer.training:
            self.consumed += 1
        return batch

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, state):
        self.consumed = state["consumed"]


def one_thread():
    """Module fixture body: tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine
    OpenMP's spinning threads make them many times slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
