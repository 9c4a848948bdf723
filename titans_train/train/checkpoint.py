"""Checkpoints: atomic writes, rotation, finding the newest valid one, reading our metadata and weights.

A checkpoint is a Lightning checkpoint (model, optimiser, schedule, loop progress, the data module's cursor)
plus our entry under `module.CKPT_KEY` (resolved recipe, counters, W&B run id, RNG states). It is named
`step-000000100.ckpt` and comes in one of three formats (`checkpoint_format`):

    file       one `torch.save`d dict: single device, ddp, and fsdp with `checkpoint.sharded=false`.
    sharded    a directory written by torch.distributed.checkpoint (DCP) under fsdp: every rank's shards of model
               and optimiser (`__<rank>_0.distcp`), DCP's index `.metadata`, and Lightning's `meta.pt` (the rest,
               our entry included). DCP reshards on load, so it resumes on any number of processes.
    deepspeed  a directory written by DeepSpeed's engine (`deepspeed_stage_2/3`): `latest` names a tag folder with
               `*model_states.pt` (Lightning's client state, our entry included) and one `*optim_states.pt` per
               rank. It resumes on the same number of processes.

Anything under a `step-*.ckpt` name is complete. A file is written to a temporary name in the same directory,
fsync'ed, and renamed with `os.replace` (atomic on POSIX). A directory is written by all ranks under
`.step-*.ckpt.tmp`, and rank 0 renames it once every rank has finished (`save_directory_atomically`): a kill
mid-save leaves only the hidden temporary, which nothing reads and rotation removes. Deleting renames first too.
The resolved recipe is written next to each checkpoint as `step-000000100.yaml`, and `last.ckpt` is a symlink
to the newest checkpoint (file or directory).

Export, generate and validate read the weights of any format on one process (`load_weights`), without
torch.distributed: DCP's shards are read into whole tensors, DeepSpeed's ZeRO partitions consolidated into fp32.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from titans_train.train.module import CKPT_KEY

CKPT_RE = re.compile(r"^step-(\d+)\.ckpt$")
DEBRIS_RE = re.compile(r"^\.step-\d+\.ckpt\.(tmp|del)$")  # what a killed directory save or delete leaves
DCP_META = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


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
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(path: Path) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_directory_atomically(strategy, path: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Collective: every rank calls `save(tmp)` with the same hidden temporary directory next to `path`; once
    all have returned, rank 0 fsyncs it and renames it onto `path` (replacing what was there)."""
    path = Path(strategy.broadcast(str(path)))
    tmp = path.with_name(f".{path.name}.tmp")
    if strategy.is_global_zero:
        _remove_tree(tmp)  # a killed save of the same step
        path.parent.mkdir(parents=True, exist_ok=True)
    strategy.barrier("titans_checkpoint_tmp")
    save(tmp)
    strategy.barrier("titans_checkpoint_written")
    if strategy.is_global_zero:
        for root, _, files in os.walk(tmp):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(Path(root))
        if path.exists() or path.is_symlink():
            remove_checkpoint(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    strategy.barrier("titans_checkpoint_renamed")


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint file or directory; a directory is renamed away first, so that a kill mid-delete
    leaves no partial checkpoint under a `step-*.ckpt` name."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        trash = path.with_name(f".{path.name}.del")
        _remove_tree(trash)
        os.replace(path, trash)
        _remove_tree(trash)
    else:
        path.unlink(missing_ok=True)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


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


# --- the three formats -------------------------------------------------------------------------------------------


def checkpoint_format(path: str | os.PathLike) -> str:
    """'file', 'sharded' (torch.distributed.checkpoint directory) or 'deepspeed' (DeepSpeed directory); a path
    that is none of them is a ValueError saying what it is."""
    p = Path(path)
    if p.is_file():
        return "file"
    if not p.exists():
        raise ValueError(f"{path}: no such file or directory")
    if not p.is_dir():
        raise ValueError(f"{path} is neither a file nor a directory")
    if (p / ".metadata").is_file() or (p / DCP_META).is_file():
        return "sharded"
    if (p / "latest").is_file():
        return "deepspeed"
    if (p / "model.safetensors").is_file():
        raise ValueError(f"{path} is a `titans-train export` directory, not a checkpoint")
    raise ValueError(f"{path} is a directory but neither a sharded checkpoint (torch.distributed.checkpoint: "
                     "`.metadata` and `meta.pt`) nor a DeepSpeed one (`latest` and its tag folder)")


def _deepspeed_files(path: Path) -> tuple[Path, list[Path]]:
    """(model states file with the client state, optimiser state files) of the tag `latest` names."""
    tag = (path / "latest").read_text().strip()
    folder = path / tag
    if not tag or not folder.is_dir():
        raise ValueError(f"{path}/latest names {tag!r}, which is not a folder in {path}")
    model = next((folder / n for n in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
                  if (folder / n).is_file()), None)
    if model is None:
        raise ValueError(f"{folder} holds no DeepSpeed model states file (mp_rank_00_model_states.pt)")
    return model, sorted(folder.glob("*optim_states.pt"))


def _check_dcp_complete(path: Path) -> None:
    """Every byte range that DCP's index names exists (a shard missing or cut short is a ValueError)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / DCP_META).is_file():
        raise ValueError(f"{path} has no {DCP_META}")
    need: dict[str, int] = {}
    for info in FileSystemReader(str(path)).read_metadata().storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in need.items():
        f = path / name
        if not f.is_file() or f.stat().st_size < size:
            raise ValueError(f"{path}: shard {name} is missing or shorter than its index says")


def read_full(path: str | os.PathLike) -> dict:
    """Everything of a checkpoint except model and optimiser tensors where they are sharded: the whole dict of a
    file; `meta.pt` of a sharded directory; DeepSpeed's model states file (client state) of a DeepSpeed one."""
    fmt = checkpoint_format(path)
    if fmt == "file":
        return load_checkpoint(path)
    if fmt == "sharded":
        return load_checkpoint(Path(path) / DCP_META)
    # DeepSpeed's own objects may need full unpickling; DeepSpeed (resume) and its zero_to_fp32 (export) load these
    # files that way anyway, so weights_only would protect nothing here.
    return torch.load(_deepspeed_files(Path(path))[0], map_location="cpu", weights_only=False, mmap=True)


def read_meta(path: str | os.PathLike) -> dict:
    """Our metadata (recipe, counters, W&B run id) from a checkpoint of any format."""
    return read_full(path).get(CKPT_KEY, {})


def is_valid(path: str | os.PathLike) -> bool:
    """Whether `path` is a complete checkpoint of ours: a file that loads with our metadata and a state dict; a
    sharded directory whose `meta.pt` holds our metadata and whose shards are all there; a DeepSpeed directory
    whose client state holds our metadata, with one optimiser file per data-parallel rank."""
    try:
        fmt = checkpoint_format(path)
        ckpt = read_full(path)
        if CKPT_KEY not in ckpt:
            return False
        if fmt == "file":
            return "state_dict" in ckpt
        if fmt == "sharded":
            _check_dcp_complete(Path(path))
            return True
        return len(_deepspeed_files(Path(path))[1]) == int(ckpt.get("dp_world_size", 1))
    except Exception:
        return False


def saved_world_size(path: str | os.PathLike) -> int | None:
    """The number of data-parallel ranks a DeepSpeed checkpoint was written by (None for the other formats,
    which resume on any number)."""
    if checkpoint_format(path) != "deepspeed":
        return None
    return int(read_full(path).get("dp_world_size", 1))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The LightningModule's state dict (keys `model.*`), whole tensors on CPU, from a checkpoint of any format,
    in this one process (no torch.distributed needed)."""
    fmt = checkpoint_format(path)
    if fmt == "file":
        return load_checkpoint(path)["state_dict"]
    if fmt == "sharded":
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        _check_dcp_complete(Path(path))
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore")
            return _load_state_dict_from_keys({"state_dict"}, checkpoint_id=str(path))["state_dict"]
    _deepspeed_files(Path(path))
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports on stdout (generate prints its text there)
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise ValueError(f"{path} is a DeepSpeed checkpoint: reading it needs deepspeed "
                             "(pip install -e '.[deepspeed]')") from None
        state = get_fp32_state_dict_from_zero_checkpoint(str(path))  # ZeRO partitions -> whole fp32 tensors
    # Checkpoints of Lightning < 2.1 name the module through its wrapper.
    return {k.removeprefix("_forward_module."): v for k, v in state.items()}


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints (files or directories) in `directory`, oldest first (by step number in the name)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_valid(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `directory` that is complete; broken ones are reported and skipped, never deleted."""
    for p in reversed(list_checkpoints(directory)):
        if is_valid(p):
            return p
        warnings.warn(f"skipping unreadable checkpoint {p}", stacklevel=2)
    return None


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
        """Delete all but the newest `keep_last_k` checkpoints (files or directories), and what killed directory
        saves and deletes left behind (no save is running now: every rank has finished this one)."""
        for p in self.dirpath.iterdir():
            if DEBRIS_RE.match(p.name):
                _remove_tree(p)
        if self.keep_last_k <= 0:
            return
        for old in list_checkpoints(self.dirpath)[: -self.keep_last_k]:
            remove_checkpoint(old)
            old.with_suffix(".yaml").unlink(missing_ok=True)

    def state_dict(self) -> dict:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_saved_step = state_dict.get("last_saved_step", -1)
