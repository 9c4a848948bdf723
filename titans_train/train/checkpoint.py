"""Checkpoint files: atomic writes, rotation, finding the newest valid one, and reading our metadata.

A checkpoint is a Lightning checkpoint (model, optimiser, schedule, loop progress, the data module's cursor)
plus our entry under `module.CKPT_KEY` (resolved recipe, counters, W&B run id, RNG states). Files are named
`step-000000100.ckpt`; a file with that name is always complete, because it is written to a temporary name in
the same directory, fsync'ed, and renamed with `os.replace` (atomic on POSIX). The resolved recipe is written
next to each checkpoint as `step-000000100.yaml`, and `last.ckpt` is a symlink to the newest checkpoint.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from titans_train.train.module import CKPT_KEY

CKPT_RE = re.compile(r"^step-(\d+)\.ckpt$")


def ckpt_name(step: int) -> str:
    return f"step-{step:09d}.ckpt"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(file_object)` on a temporary file next to `path`, fsync it, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def link_last(path: Path) -> None:
    """Point `last.ckpt` (a relative symlink beside it) at `path`, atomically: what the README's commands use."""
    last = path.parent / "last.ckpt"
    tmp = path.parent / f".last.ckpt.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(path.name, tmp)
    os.replace(tmp, last)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that never leaves a half-written file under the final name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """torch.load with weights_only=True (plain data and tensors only), memory-mapped."""
    return torch.load(path, map_location=map_location, weights_only=True, mmap=True)


def is_valid(path: str | os.PathLike) -> bool:
    """Whether `path` loads as one of our checkpoints (a complete zip with our metadata and a state dict)."""
    try:
        ckpt = load_checkpoint(path)
        return CKPT_KEY in ckpt and "state_dict" in ckpt
    except Exception:
        return False


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in `directory`, oldest first (by step number in the name)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_valid(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `directory` that loads; broken ones are reported and skipped, never deleted."""
    for p in reversed(list_checkpoints(directory)):
        if is_valid(p):
            return p
        warnings.warn(f"skipping unreadable checkpoint {p}", stacklevel=2)
    return None


def read_meta(path: str | os.PathLike) -> dict:
    """Our metadata (recipe, counters, W&B run id) from a checkpoint."""
    return load_checkpoint(path).get(CKPT_KEY, {})


class PeriodicCheckpoint(Checkpoint):
    """Save every `every_steps` optimiser steps and at the end of training; keep the last `keep_last_k`.

    Being a `Checkpoint` subclass, it replaces Lightning's default ModelCheckpoint. Saves happen only on
    step boundaries (after the last window of an accumulation), so the saved data cursor is exactly the
    last consumed batch.
    """

    def __init__(self, dirpath: str, every_steps: int, keep_last_k: int, recipe_yaml: str = ""):
        self.dirpath, self.every_steps, self.keep_last_k = Path(dirpath), every_steps, keep_last_k
        self.recipe_yaml = recipe_yaml
        self.last_saved_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, stats = trainer.global_step, getattr(pl_module, "step_stats", None)
        if stats is None or stats.skipped or step == self.last_saved_step:  # only after a step that was taken
            return
        if step % self.every_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self.last_saved_step and getattr(pl_module, "micro", 0) == 0:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        step = trainer.global_step
        path = self.dirpath / ckpt_name(step)
        trainer.save_checkpoint(path, weights_only=False)  # the full state (optimiser, loops, data cursor)
        if trainer.is_global_zero:
            if self.recipe_yaml:
                atomic_write(path.with_suffix(".yaml"), lambda f: f.write(self.recipe_yaml.encode()))
            self._rotate()
            link_last(path)
        trainer.strategy.barrier("titans_checkpoint")
        self.last_saved_step = step
        return path

    def _rotate(self) -> None:
        if self.keep_last_k <= 0:
            return
        for old in list_checkpoints(self.dirpath)[: -self.keep_last_k]:
            old.unlink(missing_ok=True)
            old.with_suffix(".yaml").unlink(missing_ok=True)

    def state_dict(self) -> dict:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_saved_step = state_dict.get("last_saved_step", -1)
