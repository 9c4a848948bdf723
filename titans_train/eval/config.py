"""`eval` section of a recipe: evaluation during `fit` (rank 0, every N optimiser steps, logged under `eval/...`).

`titans_train/config.py` composes `EvalConfig` into the recipe schema. The same measures run after training with
`titans-train eval CKPT --task ppl|niah` (titans_train/eval/cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from titans_train.eval.niah import HAYSTACKS, NEEDLES


@dataclass
class EvalConfig:
    """`eval`: loss by position on a small held-out set and optionally a small needle grid, during training."""

    every_steps: int = 0
    """Run every this many optimiser steps on rank 0 (0: never)."""
    split: str = "validation"
    """Manifest split of data.path whose documents are scored (streamed and windowed loss by position)."""
    max_tokens: int = 16384
    """Target tokens scored per evaluation (documents in shard order, the last one cut)."""
    window: Optional[int] = None
    """Length of the isolated windows the streamed loss is compared with; null: data.n_chunks * data.chunk_len."""
    piece_len: int = 1024
    """Tokens per model call when streaming (memory use is bounded by it, not by the document length)."""
    niah_lengths: list[int] = field(default_factory=list)
    """Needle-in-a-haystack prompt lengths to score too (empty: no needle grid)."""
    niah_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    """Needle depths in [0, 1] (0: the start of the haystack, 1: just before the question)."""
    niah_samples: int = 2
    """Samples per (length, depth)."""
    niah_needle: str = "passkey"
    """passkey | number | uuid (titans_train/eval/niah.py)."""
    niah_digits: Optional[int] = None
    """Digits of a passkey / number value; null: 5 / 7."""
    niah_haystack: str = "noise"
    """noise (a repeated filler paragraph) | corpus (documents of `split`)."""
    seed: int = 0
    """Seed of the needles."""

    def __post_init__(self):
        def check(ok, key, msg):
            if not ok:
                raise ValueError(f"eval.{key}: {msg}")

        check(self.every_steps >= 0, "every_steps", f"must be >= 0 (0 = never), got {self.every_steps}")
        check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        check(self.window is None or self.window >= 1, "window", f"must be >= 1 or null, got {self.window}")
        check(self.piece_len >= 1, "piece_len", f"must be >= 1, got {self.piece_len}")
        check(all(n >= 1 for n in self.niah_lengths), "niah_lengths", f"lengths must be >= 1, got {self.niah_lengths}")
        check(all(0 <= d <= 1 for d in self.niah_depths), "niah_depths", f"depths are in [0, 1], got {self.niah_depths}")
        check(self.niah_samples >= 1, "niah_samples", f"must be >= 1, got {self.niah_samples}")
        check(self.niah_needle in NEEDLES, "niah_needle", f"must be one of {', '.join(NEEDLES)}, got {self.niah_needle!r}")
        check(self.niah_haystack in HAYSTACKS, "niah_haystack",
              f"must be one of {', '.join(HAYSTACKS)}, got {self.niah_haystack!r}")
        check(self.niah_digits is None or self.niah_digits >= 1, "niah_digits", "must be >= 1 or null")
        check(bool(self.split), "split", "must name a split of data.path's manifest")
