"""Recipe sections for training: `train`, `optim`, `trainer`, `logging`, `checkpoint`, `launch`.

Each is a dataclass with a comment per field and a `__post_init__` that names the key it rejects. They are
composed into the one recipe schema, `titans_train.config.SECTIONS` / `Recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


# `trainer.strategy` values (built in `titans_train/train/strategies.py`).
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {msg}")


@dataclass
class TrainConfig:
    """The training loop over windows of sequence chunks."""

    # Backward and detach the memory state every this many sequence chunks of a window; 0 = n_chunks
    # (exact backprop through the whole window).
    tbptt_chunks: int = 0
    # Windows (batches) per optimiser step; gradients are accumulated without DDP sync in between.
    accumulate_windows: int = 1
    # Reset a row's memory state before a chunk that begins a new document.
    reset_on_doc_start: bool = True
    # A step whose loss or gradient norm is not finite is skipped; this many in a row stop the run.
    max_skipped_in_a_row: int = 10
    # Seed for parameters, data order and every RNG (Lightning's seed_everything).
    seed: int = 1337
    # Evaluate on the validation split once before the first step, so the logs show where the loss started.
    val_at_start: bool = True

    def __post_init__(self):
        _check(self.tbptt_chunks >= 0, "train.tbptt_chunks", f"must be >= 0 (0 = n_chunks), got {self.tbptt_chunks}")
        _check(self.accumulate_windows >= 1, "train.accumulate_windows", f"must be >= 1, got {self.accumulate_windows}")
        _check(self.max_skipped_in_a_row >= 1, "train.max_skipped_in_a_row", "must be >= 1")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warmup, then cosine)."""

    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup, in optimiser steps
    decay_steps: Optional[int] = None  # cosine reaches min_lr here (optimiser steps); null = trainer.max_steps
    weight_decay: float = 0.1  # not applied to norms, biases, embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings."""

    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = "auto"  # int or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp (FSDP2) | deepspeed_stage_2 | deepspeed_stage_3 (GPU); see strategies.py
    precision: str = "auto"  # auto = bf16-mixed on GPU (memory math stays fp32), 32-true on CPU; or a Lightning value
    max_steps: int = 1000  # optimiser steps
    val_every_steps: int = 200  # validate every this many optimiser steps
    log_every_steps: int = 10
    deterministic: bool = False  # torch deterministic algorithms (slower; used by the resume test)
    # Recompute each block's activations in backward (less memory, ~1/3 more compute); any strategy.
    activation_checkpointing: bool = False
    fsdp_cpu_offload: bool = False  # strategy fsdp: parameters, gradients and optimiser state in host memory
    deepspeed_config: Optional[str] = None  # strategy deepspeed_*: JSON merged over the config derived from the recipe

    def __post_init__(self):
        _check(self.strategy in STRATEGIES, "trainer.strategy", f"must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        _check(self.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.val_every_steps >= 1, "trainer.val_every_steps", "must be >= 1")
        _check(self.log_every_steps >= 1, "trainer.log_every_steps", "must be >= 1")


@dataclass
class LoggingConfig:
    """Where the run writes, and W&B."""

    run_name: str = "titans"
    out_dir: Optional[str] = None  # CSV logs, W&B files and (by default) checkpoints; null = runs/<run_name>
    # auto (online with an API key, else offline) | online | offline | off (YAML's bare off/false/true work too)
    wandb: Union[str, bool] = "auto"
    project: str = "titans-train"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.wandb, bool):
            self.wandb = "auto" if self.wandb else "off"
        _check(self.wandb in ("auto", "online", "offline", "off"), "logging.wandb",
               f"must be one of auto, online, offline, off; got {self.wandb!r}")


@dataclass
class CheckpointConfig:
    """Checkpoints: atomic writes, rotation, automatic resume."""

    dir: Optional[str] = None  # null = <logging.out_dir>/checkpoints
    every_steps: int = 500  # optimiser steps between checkpoints (and one at the end)
    keep_last_k: int = 3  # older periodic checkpoints are deleted; 0 = keep all
    resume: str = "auto"  # auto (newest valid checkpoint in dir, if any) | none | a checkpoint path

    def __post_init__(self):
        _check(self.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
        _check(self.keep_last_k >= 0, "checkpoint.keep_last_k", "must be >= 0 (0 = keep all)")


@dataclass
class LaunchConfig:
    """Cluster launch (SLURM); used by `titans-train launch`."""

    partition: Optional[str] = None  # sbatch --partition (the CLI's --partition wins)
    account: Optional[str] = None  # sbatch --account (the CLI's --account wins)
    time: str = "24:00:00"  # sbatch --time; a requeued job starts a new allocation of this length
    cpus_per_task: int = 8  # CPU cores per rank (data workers + the main process)
    # Windows per optimiser step over all ranks; when set, `launch` derives data.batch_size = global_batch /
    # (nodes x gpus_per_node x train.accumulate_windows) and refuses a world size that does not divide it.
    global_batch: Optional[int] = None
    signal_seconds: int = 120  # SLURM sends SIGUSR1 this long before the time limit: save, exit, requeue
    log_dir: str = "slurm_logs"  # <log_dir>/<job name>-<job id>.out, appended across requeues
    setup: str = ""  # shell lines run before srun on the first node (module load, source .venv/bin/activate)
    sbatch_extra: list[str] = field(default_factory=list)  # more `#SBATCH` options, e.g. ["--exclusive"]

    def __post_init__(self):
        _check(self.cpus_per_task >= 1, "launch.cpus_per_task", "must be >= 1")
        _check(self.global_batch is None or self.global_batch >= 1, "launch.global_batch", "must be >= 1 or null")
        _check(self.signal_seconds >= 0, "launch.signal_seconds", "must be >= 0")

