"""Monitoring callbacks, one concern per file; each reads `pl_module.step_stats` after an optimiser step."""

from titans_train.train.callbacks.chunk_loss import ChunkLoss
from titans_train.train.callbacks.eval import EvalDuringFit
from titans_train.train.callbacks.memory import PeakMemory
from titans_train.train.callbacks.progress import StepProgressBar
from titans_train.train.callbacks.throughput import Throughput, device_peak_flops

__all__ = ["ChunkLoss", "EvalDuringFit", "PeakMemory", "StepProgressBar", "Throughput", "device_peak_flops"]
