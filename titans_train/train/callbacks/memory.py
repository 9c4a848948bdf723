"""Peak memory: accelerator memory where there is one (`memory/peak_gib`), and host RSS (`memory/peak_rss_gib`).

`saved_tensor_peak` measures activation memory on any device: the peak bytes of the tensors autograd holds for
backward. That is what truncated backprop bounds (`train.tbptt_chunks`), and on CPU, where there is no allocator
counter, it is the figure to compare settings by (RSS also holds the weights, the optimiser and freed pages).
"""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import lightning as L
import torch


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


@dataclass
class SavedTensorPeak:
    """Live and peak bytes of the storages autograd saved for backward (each storage counted once)."""

    live: int = 0
    peak: int = 0


class _Saved:
    """What autograd keeps instead of the tensor: releases its bytes from the meter when autograd drops it."""

    __slots__ = ("t", "key", "meter", "refs")

    def __init__(self, t: torch.Tensor, meter: SavedTensorPeak, refs: dict):
        self.t, self.meter, self.refs = t, meter, refs
        storage = t.untyped_storage()
        self.key = (storage.data_ptr(), t.device)
        n, count = refs.get(self.key, (storage.nbytes(), 0))
        if count == 0:
            meter.live += n
            meter.peak = max(meter.peak, meter.live)
        refs[self.key] = (n, count + 1)

    def __del__(self):
        n, count = self.refs[self.key]
        if count == 1:
            del self.refs[self.key]
            self.meter.live -= n
        else:
            self.refs[self.key] = (n, count - 1)


@contextmanager
def saved_tensor_peak() -> Iterator[SavedTensorPeak]:
    """Within the block, count the bytes of tensors saved for backward; `.peak` is the most alive at once.
    Tensors a custom autograd Function keeps as plain attributes (not `save_for_backward`) are not seen."""
    meter, refs = SavedTensorPeak(), {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(t, meter, refs), lambda s: s.t):
        yield meter


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
