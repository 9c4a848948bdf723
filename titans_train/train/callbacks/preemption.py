"""Preemption: SIGUSR1 or SIGTERM during `fit` -> finish the optimiser step, save a checkpoint, stop cleanly.

SLURM sends SIGUSR1 `launch.signal_seconds` before the time limit (`#SBATCH --signal=USR1@...` in the rendered
script) and SIGTERM when it preempts or cancels the job. The handler only sets a flag. At the end of each
optimiser step the ranks agree on it (a max over ranks: a signal may reach only some of them, e.g. only rank 0
of processes Lightning started itself), then save through `PeriodicCheckpoint.save` (the same atomic files that
`checkpoint.resume: auto` picks up) and stop the trainer. `fit` then exits with `REQUEUE_EXIT`, which the sbatch
script answers with `scontrol requeue`; the requeued job resumes from that checkpoint.

Lightning installs its own SIGTERM handler when `fit` starts (it broadcasts from inside the handler and raises
mid-step); ours replaces it for these signals from the start of training and the previous handlers come back
at the end.
"""

from __future__ import annotations

import signal
import threading

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again later"; launch/sbatch.template requeues the job on it


class Preemption(Callback):
    """Save and stop at the next optimiser-step boundary after one of `signals` arrives."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.signals = signals
        self.received: int | None = None  # the signal that arrived (runtime only)
        self.stopped_at: int | None = None  # the step saved when we stopped
        self._previous: dict[int, object] = {}

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.signals:
            old = signal.signal(s, self._handle)
            self._previous.setdefault(s, old)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._install()  # covers start-up; Lightning replaces SIGTERM's when the run starts ...

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._install()  # ... so take it back here

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(pl_module, "micro", 0) != 0:  # mid accumulation: the step is not done yet
            return
        flag = torch.tensor(0 if self.received is None else 1, device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if not int(flag):
            return
        from titans_train.train.checkpoint import PeriodicCheckpoint

        saver = next((cb for cb in trainer.callbacks if isinstance(cb, PeriodicCheckpoint)), None)
        if saver is not None and saver.last_saved_step != trainer.global_step:
            saver.save(trainer)
        self.stopped_at = trainer.global_step
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s, old in self._previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._previous = {}
