"""Peak memory: accelerator memory where there is one (`memory/peak_gib`), and host RSS (`memory/peak_rss_gib`)."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import lightning as L
import torch


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


@dataclass
class PeakMemory(L.Callback):
    every_steps: int = 10

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.step_stats is None or trainer.global_step % self.every_steps != 0:
            return
        metrics = {"memory/peak_rss_gib": peak_rss_gib()}
        device = pl_module.device
        if device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
