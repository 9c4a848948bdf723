"""Lightning DataModule over prepared shards: an infinite, exactly resumable training stream and a finite
validation pass (see `stream.py`). Train with `max_steps`; the training loader has no length.

Exact resume needs the cursor of the batch that was *trained on*: `on_before_batch_transfer` (which Lightning
calls for the batch it is about to train on, after any prefetching) commits each training batch's cursor, and
`state_dict()` returns the committed cursors of every rank, which Lightning stores in the checkpoint.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from titans_train.data.config import DataConfig
from titans_train.data.shards import DataError, Manifest
from titans_train.data.stream import PackedStream, ValStream

STATE_VERSION = 2  # 2: one cursor per lane (batch row) of every stream; 1 had one per stream
log = logging.getLogger(__name__)


class TitansDataModule(L.LightningDataModule):
    """Batches are dicts: tokens (B, L+1) int64, doc_start (B, L+1) bool; training batches also carry
    `cursor` (B, 6) and `stream` () for resume; row r of every batch continues lane r of its stream. Inputs are tokens[:, :-1], targets tokens[:, 1:]; sequence chunk
    `c` is columns [c * chunk_len, (c + 1) * chunk_len) of both.

    Args:
        cfg: the recipe's `data` section.
        rank, world_size: override the trainer's (tests and tools that run without a Trainer).
    """

    def __init__(self, cfg: DataConfig, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self._rank, self._world_size = rank, world_size
        self.manifest: Manifest | None = None
        self.tokenizer = None
        self.train_stream: PackedStream | None = None
        self.val_stream: ValStream | None = None
        self._pending_state: dict | None = None

    def _ranks(self) -> tuple[int, int]:
        if self._rank is not None:
            return self._rank, self._world_size or 1
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is not None:
            return
        cfg = self.cfg
        rank, world = self._ranks()
        self.manifest = Manifest(cfg.path)
        self.tokenizer = self.manifest.load_tokenizer(cfg.tokenizer)  # refuses shards of another tokenizer
        common = dict(window_len=cfg.window_len(), batch_size=cfg.batch_size, rank=rank, world_size=world,
                      num_workers=cfg.num_workers, skip_corrupt=cfg.skip_corrupt)
        self.train_stream = PackedStream(self.manifest, cfg.train_split, seed=cfg.seed,
                                         shuffle_shards=cfg.shuffle_shards, shuffle_buffer=cfg.shuffle_buffer, **common)
        if cfg.val_split and cfg.val_split in self.manifest.splits():
            self.val_stream = ValStream(self.manifest, cfg.val_split, max_batches=cfg.val_batches, **common)
            if self.val_stream.num_batches() == 0:
                log.warning(
                    "validation split %r of %s is smaller than one batch per stream (%d ranks x %d workers x %d "
                    "windows of %d tokens): validation will be empty; lower data.batch_size or prepare with a larger "
                    "--val-fraction", cfg.val_split, self.manifest.path, world, max(cfg.num_workers, 1),
                    cfg.batch_size, cfg.window_len())
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)

    def _loader(self, dataset) -> DataLoader:
        nw = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=None,  # the streams batch (one batch = one window of each lane of one stream)
            num_workers=nw,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.cfg.persistent_workers and nw > 0,
            prefetch_factor=self.cfg.prefetch_factor if nw > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_stream)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        return self._loader(self.val_stream) if self.val_stream is not None else []

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        if isinstance(batch, dict) and "cursor" in batch and self.train_stream is not None:
            self.train_stream.commit(batch)
        return batch

    # --- checkpoint ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Committed cursors of every rank (gathered when torch.distributed runs: every rank calls this while
        Lightning builds a checkpoint; rank 0 writes it)."""
        if self.train_stream is None:
            return {}
        rank, world = self._ranks()
        local = self.train_stream.state_dict()
        ranks = [None] * world
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_gather_object(ranks, local)
        else:
            ranks[rank] = local
        return {
            "version": STATE_VERSION,
            "world_size": world,
            "num_workers": self.cfg.num_workers,
            "seed": self.cfg.seed,
            "split": self.cfg.train_split,
            "ranks": ranks,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.train_stream is None:  # Lightning restores before setup in some strategies: apply in setup
            self._pending_state = state
            return
        self._pending_state = None
        rank, world = self._ranks()
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"the checkpoint's data position has format version {state.get('version')}, this titans-train reads "
                f"{STATE_VERSION} (one cursor per batch row): it cannot continue that data exactly; start a new run "
                "from its weights with train.init_from=<checkpoint>"
            )
        if (state["world_size"], state["num_workers"]) != (world, self.cfg.num_workers):
            regrouped = regroup_streams(state, world, self.cfg.num_workers)  # same streams, split otherwise
            if regrouped is None:
                raise DataError(
                    f"the checkpoint's data position was saved with {state['world_size']} ranks x data.num_workers="
                    f"{state['num_workers']}, this run has {world} x {self.cfg.num_workers}: use the same number of "
                    "streams (ranks x workers) to resume the data exactly"
                )
            state = regrouped
        if state["seed"] != self.cfg.seed or state["split"] != self.cfg.train_split:
            raise DataError(
                f"the checkpoint's data position is for data.seed={state['seed']}, split {state['split']!r}; this "
                f"run has seed {self.cfg.seed}, split {self.cfg.train_split!r}: use the same to resume exactly"
            )
        mine = state["ranks"][rank]
        if mine is None:
            raise DataError(f"the checkpoint has no data position for rank {rank} (saved without torch.distributed)")
        self.train_stream.load_state_dict(mine)


def regroup_streams(state: dict, world: int, num_workers: int) -> dict | None:
    """A saved data position re-split over `world` ranks x `num_workers` workers, or None if that is not exact.

    Global stream `g = rank * streams_per_rank + worker` reads the same data whatever the split, so a run saved
    with 2 ranks x 1 worker continues exactly on 1 rank x 2 workers (or the reverse): each new rank takes its
    streams' cursors, and its `consumed` count must put its round-robin at the next stream to read (stream `j`
    of a rank has yielded `consumed // n + (j < consumed % n)` batches). The total stream count must match.
    """
    old_n = max(state["num_workers"], 1)
    new_n = max(num_workers, 1)
    if state["world_size"] * old_n != world * new_n or any(r is None for r in state["ranks"]):
        return None
    cursors, counts = [], []
    for r in state["ranks"]:
        c = int(r["consumed"])
        cursors += r["cursors"]
        counts += [c // old_n + (j < c % old_n) for j in range(old_n)]
    ranks = []
    for r in range(world):
        mine = counts[r * new_n:(r + 1) * new_n]
        consumed = sum(mine)
        if mine != [consumed // new_n + (j < consumed % new_n) for j in range(new_n)]:
            return None  # the streams of this rank are not at one round-robin position
        ranks.append({"consumed": consumed, "cursors": cursors[r * new_n:(r + 1) * new_n]})
    return {**state, "world_size": world, "num_workers": num_workers, "ranks": ranks}
