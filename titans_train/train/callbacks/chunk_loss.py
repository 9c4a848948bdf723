"""Training loss by sequence-chunk index within the window: how much the carried memory state helps.

With the memory working, later chunks of a window (which see the state built over earlier ones) reach a lower
loss than chunk 0. Logged as `train/loss_chunk/00`, `.../01`, ...; validation logs the same under `val/`.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L


@dataclass
class ChunkLoss(L.Callback):
    every_steps: int = 10  # log every this many optimiser steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = pl_module.step_stats
        if stats is None or stats.skipped or trainer.global_step % self.every_steps != 0:
            return
        metrics = {f"train/loss_chunk/{i:02d}": float(v) for i, v in enumerate(stats.chunk_losses)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
