"""Throughput and MFU, computed in one place.

tokens/s is measured over the optimiser steps since the last log, skipping the first step of the run (and of
a resumed run), which pays for warm-up and compilation. MFU = achieved model FLOP/s / (peak FLOP/s of the
device x number of devices), with the model's own `flops_per_token(seq_len)` (forward + backward) at the
sequence-chunk length; it is logged only where the device's peak is known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import lightning as L
import torch

# Dense bf16 peak FLOP/s (no sparsity), from the vendors' data sheets.
_PEAKS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16
}


def device_peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAKS.items():
        if key in name:
            return peak
    return None


@dataclass
class Throughput(L.Callback):
    every_steps: int = 10
    _t0: float | None = field(default=None, repr=False)
    _tokens: int = field(default=0, repr=False)
    _steps_seen: int = field(default=0, repr=False)
    _flops_per_token: float | None = field(default=None, repr=False)

    def setup(self, trainer, pl_module, stage) -> None:
        model = pl_module.model
        if hasattr(model, "flops_per_token"):
            self._flops_per_token = float(model.flops_per_token(pl_module.chunk_len))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = pl_module.step_stats
        if stats is None:
            return
        now = time.perf_counter()
        self._steps_seen += 1
        if self._steps_seen == 1 or self._t0 is None:  # warm-up step: start the clock after it
            self._t0, self._tokens = now, 0
            return
        self._tokens += stats.tokens
        if trainer.global_step % self.every_steps != 0:
            return
        dt = now - self._t0
        tps = self._tokens / max(dt, 1e-9)
        metrics = {"throughput/tokens_per_s": tps, "throughput/tokens_per_s_per_device": tps / trainer.world_size}
        peak = device_peak_flops(pl_module.device)
        if self._flops_per_token is not None:
            metrics["throughput/tflops_per_device"] = tps * self._flops_per_token / trainer.world_size / 1e12
            if peak:
                metrics["throughput/mfu"] = tps * self._flops_per_token / (peak * trainer.world_size)
        pl_module.log("tok/s", tps, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._t0, self._tokens = now, 0
