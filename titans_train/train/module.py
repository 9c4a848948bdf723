"""The LightningModule: manual optimisation over windows of sequence chunks (see `tbptt.py`).

One training_step = one window (one batch). Every `train.accumulate_windows` windows the module clips, checks
that loss and gradient norm are finite, and steps AdamW and the schedule; a non-finite step is skipped and
counted, and `train.max_skipped_in_a_row` of them stop the run with `TrainingDiverged`.

What monitoring callbacks need is left on the module after each step (`step_stats`), so the arithmetic for
throughput, loss by chunk and memory lives in the callbacks, one concern each.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from titans_train.train.optim import build_optimizer
from titans_train.train.strategies import clip_grad_norm, configure_model
from titans_train.train.tbptt import window_step

CKPT_KEY = "titans"  # our entry in the Lightning checkpoint dict


class TrainingDiverged(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient norm."""


@dataclass
class StepStats:
    """What the last optimiser step did; read by the callbacks in `titans_train/train/callbacks/`."""

    loss: float
    chunk_losses: Tensor  # (n_chunks,) mean over the step's windows, detached, on CPU
    grad_norm: float
    lr: float
    skipped: bool
    tokens: int  # tokens processed by this step on all ranks


def _unpack(batch: Any) -> tuple[Tensor, Tensor | None]:
    """(tokens (B, L+1), doc_start (B, L+1) bool or None) from the data module's batch."""
    if isinstance(batch, dict):
        tokens = batch.get("tokens", batch.get("input_ids"))
        return tokens, batch.get("doc_start")
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


class TitansLitModule(L.LightningModule):
    """Wraps a Titans model (`model(tokens, state) -> (logits, state)`) for training.

    Args:
        model: the network from `titans_train.models.build_model`.
        recipe: the resolved recipe as a plain dict (saved in every checkpoint).
        train_cfg / optim_cfg: the recipe's `train` and `optim` sections.
        chunk_len: `data.chunk_len`, tokens per sequence chunk.
    """

    def __init__(self, model: nn.Module, recipe: dict, train_cfg, optim_cfg, chunk_len: int):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.recipe = recipe
        self.train_cfg, self.optim_cfg, self.chunk_len = train_cfg, optim_cfg, chunk_len
        # Progress that must survive a resume (saved under CKPT_KEY).
        self.micro = 0  # windows accumulated towards the next step
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        self.tokens_seen = 0
        self.wandb_run_id: str | None = None
        # Runtime only.
        self._window_losses: list[Tensor] = []
        self.step_stats: StepStats | None = None  # set when a step (taken or skipped) just happened
        self._val_sum: Tensor | None = None
        self._val_count = 0
        self.sanity_val_metrics: dict[str, float] = {}

    # --- optimisation ----------------------------------------------------------------------------------

    def configure_model(self):
        configure_model(self)  # activation checkpointing; FSDP2 sharding under trainer.strategy=fsdp

    def configure_optimizers(self):
        opt, sched = build_optimizer(self.model, self.optim_cfg)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _no_sync(self):
        strategy = self.trainer.strategy
        return strategy.block_backward_sync() if hasattr(strategy, "block_backward_sync") else nullcontext()

    def training_step(self, batch, batch_idx):
        tokens, doc_start = _unpack(batch)
        accum = self.train_cfg.accumulate_windows
        last_window = self.micro == accum - 1
        n_chunks = (tokens.shape[1] - 1) // self.chunk_len
        losses = window_step(
            self.model,
            tokens,
            doc_start,
            chunk_len=self.chunk_len,
            tbptt_chunks=self.train_cfg.tbptt_chunks or n_chunks,
            backward=self.manual_backward,
            scale=1.0 / accum,
            no_sync=self._no_sync,
            sync_last=last_window,
            reset_memory=self.train_cfg.reset_memory,
        )
        self._window_losses.append(losses)
        self.micro = (self.micro + 1) % accum
        self.step_stats = None
        if not last_window:
            return
        self._optimizer_step(tokens.numel() - tokens.shape[0])

    def _optimizer_step(self, tokens_per_window: int) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        chunk_losses = torch.stack(self._window_losses).mean(0)  # (n_chunks,)
        self._window_losses = []
        if self.trainer.world_size > 1:
            # The loss of the global batch (what 1 process with the same global batch logs). Every rank then
            # takes the same skip decision: a non-finite loss on any rank makes the mean non-finite.
            chunk_losses = self.trainer.strategy.reduce(chunk_losses, reduce_op="mean")
        loss = chunk_losses.mean()
        clip = self.optim_cfg.grad_clip or float("inf")
        grad_norm = clip_grad_norm(self, clip)  # any strategy: DDP, FSDP2 (sharded grads), DeepSpeed
        finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))  # the synced grad norm agrees on all ranks
        lr = sched.get_last_lr()[0]
        if finite:
            opt.step()
            sched.step()
            self.skipped_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
        opt.zero_grad(set_to_none=True)
        tokens = tokens_per_window * self.train_cfg.accumulate_windows * self.trainer.world_size
        self.tokens_seen += tokens
        self.step_stats = StepStats(
            loss=float(loss), chunk_losses=chunk_losses.cpu(), grad_norm=float(grad_norm), lr=lr,
            skipped=not finite, tokens=tokens,
        )
        step = self.trainer.global_step
        if step % self.trainer.log_every_n_steps == 0 or not finite:
            self.log_to_loggers({
                "train/loss": float(loss),
                "train/ppl": perplexity(float(loss)),
                "train/lr": lr,
                "train/grad_norm": float(grad_norm),
                "train/skipped_steps": self.skipped_steps,
                "train/tokens_seen": self.tokens_seen,
            })
        self.log("train/loss", loss, logger=False, on_step=True, on_epoch=False, batch_size=1)
        self.log("loss", loss, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
        if not finite and self.skipped_in_a_row >= self.train_cfg.max_skipped_in_a_row:
            raise TrainingDiverged(
                f"{self.skipped_in_a_row} optimiser steps in a row had a non-finite loss or gradient norm "
                f"(last loss={float(loss)}, grad norm={float(grad_norm)}); stopping. Lower optim.lr, raise "
                "optim.warmup_steps or check the data; the last checkpoint is untouched."
            )

    # --- validation ------------------------------------------------------------------------------------

    def validation_step(self, batch, batch_idx):
        tokens, doc_start = _unpack(batch)
        n_chunks = (tokens.shape[1] - 1) // self.chunk_len
        losses = window_step(
            self.model, tokens, doc_start, chunk_len=self.chunk_len, tbptt_chunks=n_chunks, backward=None,
            reset_memory=self.train_cfg.reset_memory,
        )
        self._val_sum = losses if self._val_sum is None else self._val_sum + losses
        self._val_count += 1

    def on_validation_epoch_end(self):
        if self._val_sum is None:
            return
        chunk = self._val_sum / self._val_count  # (n_chunks,) mean loss of each chunk index on this rank
        self._val_sum, self._val_count = None, 0
        if self.trainer.world_size > 1:
            chunk = self.trainer.strategy.reduce(chunk, reduce_op="mean")
        loss = float(chunk.mean())
        metrics = {"val/loss": loss, "val/ppl": perplexity(loss)}
        metrics.update({f"val/loss_chunk/{i:02d}": float(v) for i, v in enumerate(chunk)})
        if self.trainer.sanity_checking:
            # Lightning drops metrics logged during the sanity check: keep them to log at step 0.
            self.sanity_val_metrics = metrics
            return
        self.log_to_loggers(metrics)
        self.log_dict(metrics, logger=False)
        self.log("val_loss", metrics["val/loss"], prog_bar=True, logger=False)

    def log_to_loggers(self, metrics: dict, step: int | None = None) -> None:
        """Write metrics at the optimiser step (Lightning's own step counter lags it in manual optimisation)."""
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.trainer.global_step if step is None else step)

    def on_train_start(self):
        if self.sanity_val_metrics and self.global_step == 0:
            for logger in self.loggers:
                logger.log_metrics(self.sanity_val_metrics, step=0)

    # --- checkpoint ------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CKPT_KEY] = {
            "recipe": self.recipe,
            "micro": self.micro,
            "skipped_steps": self.skipped_steps,
            "skipped_in_a_row": self.skipped_in_a_row,
            "tokens_seen": self.tokens_seen,
            "wandb_run_id": self.wandb_run_id,
            "rng": collect_rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(CKPT_KEY, {})
        self.micro = meta.get("micro", 0)
        self.skipped_steps = meta.get("skipped_steps", 0)
        self.skipped_in_a_row = meta.get("skipped_in_a_row", 0)
        self.tokens_seen = meta.get("tokens_seen", 0)
        self.wandb_run_id = meta.get("wandb_run_id", self.wandb_run_id)
        self._pending_rng = meta.get("rng")

    def on_train_batch_start(self, batch, batch_idx):
        # Restore RNG states only now: Lightning's restore and the loader's start consume randomness after
        # on_load_checkpoint, and the first resumed step must see exactly the state the killed run saw.
        rng = getattr(self, "_pending_rng", None)
        if rng is not None:
            set_rng_states(rng)
            self._pending_rng = None


# RNG states as plain data (tensors, ints, lists) so that checkpoints load with weights_only=True.


def collect_rng_states() -> dict:
    np_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    random.setstate((3, tuple(states["python"]), None))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
