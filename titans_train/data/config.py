"""`data` section of a recipe: where the prepared shards are and how they are streamed into windows.

`titans_train/config.py` imports `DataConfig` into the recipe schema. Words (DESIGN.md): a *sequence chunk* is
`chunk_len` tokens, the unit of forward/backward; a *window* is `n_chunks` consecutive sequence chunks of one
stream plus one token for the last target, the unit the loader yields (one row of a batch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """`data`: prepared shards (`titans-train prepare`) and the streaming pipeline over them."""

    path: str = "data/builtin"
    """Directory holding `manifest.json` and the shards (or the path of a `manifest.json`)."""
    tokenizer: str = "byte"
    """Tokenizer the recipe expects: `byte`, a `tokenizer.json` path, or `manifest` (whatever the shards used).
    A manifest prepared with another tokenizer is an error (fingerprints are compared)."""
    chunk_len: int = 512
    """Tokens per sequence chunk (forward/backward unit of truncated backprop through memory)."""
    n_chunks: int = 1
    """Sequence chunks per window; a window is `n_chunks * chunk_len + 1` tokens of one stream."""
    batch_size: int = 8
    """Windows per batch on each device (per rank)."""
    train_split: str = "train"
    """Manifest split used for training."""
    val_split: str = "validation"
    """Manifest split used for validation (empty string: no validation loader)."""
    val_batches: int | None = None
    """Cap on validation batches per rank; null: one pass over the split (equal on every rank)."""
    num_workers: int = 2
    """DataLoader worker processes per rank; each worker reads its own shards (0: read in the main process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (ignored with num_workers 0)."""
    persistent_workers: bool = True
    """Keep workers between epochs of the loader; resume stays exact either way (cursors live in shared memory)."""
    pin_memory: bool = True
    """Pin batches in page-locked memory for faster host-to-GPU copies (only used when CUDA is available)."""
    seed: int = 0
    """Seed of the data order (shard permutation per epoch and the document shuffle buffer)."""
    shuffle_shards: bool = True
    """Permute the shard order every epoch (seeded by `seed` and the epoch)."""
    shuffle_buffer: int = 1024
    """Documents shuffled together: each stream reads blocks of this many documents and permutes each block
    (seeded); 0 or 1 keeps the shard order. Blocks keep the resume cursor a handful of integers. Each worker
    holds one block of documents in memory."""
    skip_corrupt: bool = False
    """Skip unreadable (truncated, corrupt, wrong-size) shards with a logged warning and a count, instead of
    stopping with an error. Missing shards are always an error."""

    def __post_init__(self):
        for key in ("chunk_len", "n_chunks", "batch_size", "prefetch_factor"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"data.{key}={value!r} must be a positive integer")
        for key in ("num_workers", "shuffle_buffer", "seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"data.{key}={value!r} must be an integer >= 0")
        if self.val_batches is not None and (not isinstance(self.val_batches, int) or self.val_batches < 1):
            raise ValueError(f"data.val_batches={self.val_batches!r} must be a positive integer or null")
        if not self.path:
            raise ValueError("data.path must name the directory of a prepared dataset (titans-train prepare)")
        if not self.tokenizer:
            raise ValueError("data.tokenizer must be `byte`, a tokenizer.json path or `manifest`")
        if not self.train_split:
            raise ValueError("data.train_split must name a split of the manifest (e.g. train)")

    def window_len(self) -> int:
        """Tokens per window: `n_chunks * chunk_len` inputs plus one token for the last target."""
        return self.n_chunks * self.chunk_len + 1

    def tokens_per_batch(self) -> int:
        """Predicted (target) tokens per batch on one rank."""
        return self.batch_size * self.n_chunks * self.chunk_len
