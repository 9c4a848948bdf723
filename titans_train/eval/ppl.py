"""Held-out loss by position: each whole document streamed through the state, and the same targets scored in
isolated windows of the training length. Does the memory help late tokens? Compare the two curves.

Position buckets double: 0-512, 512-1K, 1K-2K, ... up to the longest document. A target at position i (the
token i + 1 of its document, predicted from tokens 0..i) falls in the bucket that holds i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from titans_train.eval.stream import token_nll

FIRST_BUCKET = 512


def bucket_of(pos: np.ndarray, first: int = FIRST_BUCKET) -> np.ndarray:
    """Bucket index of positions: 0 for [0, first), b for [first * 2^(b-1), first * 2^b)."""
    pos = np.asarray(pos)
    return np.where(pos < first, 0, np.floor(np.log2(np.maximum(pos, 1) / first)).astype(np.int64) + 1)


def bucket_range(b: int, first: int = FIRST_BUCKET) -> tuple[int, int]:
    return (0, first) if b == 0 else (first << (b - 1), first << b)


@dataclass
class PositionLoss:
    """Sums of NLL (float64) and token counts per position bucket."""

    first: int = FIRST_BUCKET
    nll: list[float] = field(default_factory=list)
    count: list[int] = field(default_factory=list)

    def add(self, start: int, nll) -> None:
        nll = np.asarray(nll, dtype=np.float64)
        b = bucket_of(np.arange(start, start + len(nll)), self.first)
        n = int(b.max()) + 1 if len(b) else 0
        while len(self.nll) < n:
            self.nll.append(0.0)
            self.count.append(0)
        sums = np.bincount(b, weights=nll, minlength=n)
        counts = np.bincount(b, minlength=n)
        for k in range(n):
            self.nll[k] += float(sums[k])
            self.count[k] += int(counts[k])

    def loss(self) -> float:
        n = sum(self.count)
        return sum(self.nll) / n if n else math.nan

    def by_bucket(self) -> list[float]:
        return [s / c if c else math.nan for s, c in zip(self.nll, self.count)]


def documents(data_path: str, split: str, max_tokens: int | None = None, min_len: int = 2) -> Iterator[np.ndarray]:
    """Documents of a prepared split in shard order (int64 ids), until `max_tokens` targets have been given
    (the last document is cut there)."""
    from titans_train.data.shards import Manifest, iter_shard

    left = max_tokens
    for shard in Manifest(data_path).shards(split):
        for doc in iter_shard(shard):
            if len(doc) < min_len:
                continue
            if left is not None:
                if left <= 0:
                    return
                doc = doc[: left + 1]
                left -= len(doc) - 1
            yield doc.astype(np.int64)


def evaluate_ppl(model, docs: Iterable[np.ndarray], window: int, piece_len: int = 1024,
                 progress=None) -> dict:
    """Loss by position of `docs` streamed (state over the whole document) and windowed (fresh state every
    `window` tokens). Returns a JSON-ready dict: overall and per-bucket loss, bits per token, token counts."""
    streamed, windowed = PositionLoss(), PositionLoss()
    n_docs = 0
    for doc in docs:
        for start, nll in token_nll(model, doc, piece_len):
            streamed.add(start, nll.numpy())
        for start, nll in token_nll(model, doc, min(piece_len, window), reset_every=window):
            windowed.add(start, nll.numpy())
        n_docs += 1
        if progress is not None:
            progress(len(doc) - 1)
    buckets = []
    for b, (ls, lw) in enumerate(zip(streamed.by_bucket(), windowed.by_bucket())):
        lo, hi = bucket_range(b, streamed.first)
        buckets.append({"start": lo, "end": hi, "tokens": streamed.count[b], "loss_streamed": ls,
                        "loss_windowed": lw, "bpt_streamed": ls / math.log(2), "bpt_windowed": lw / math.log(2)})
    return {"task": "ppl", "docs": n_docs, "tokens": sum(streamed.count), "window": window,
            "loss_streamed": streamed.loss(), "loss_windowed": windowed.loss(),
            "ppl_streamed": math.exp(streamed.loss()), "ppl_windowed": math.exp(windowed.loss()),
            "buckets": buckets}
