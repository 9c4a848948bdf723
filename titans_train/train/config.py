"""Recipe sections for training: `train`, `optim`, `trainer`, `logging`, `checkpoint`, `launch`.

Each is a dataclass with a docstring per field and a `__post_init__` that names the key it rejects. They are
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


RESET_MEMORY = ("token", "chunk", "none")


@dataclass
class TrainConfig:
    """The training loop over windows of sequence chunks."""

    tbptt_chunks: int = 0
    """Backward and detach the memory state every this many sequence chunks of a window; 0 = n_chunks (exact
    backprop through the whole window)."""
    accumulate_windows: int = 1
    """Windows (batches) per optimiser step; gradients are accumulated without DDP sync in between."""
    reset_memory: str = "token"
    """Where a row's memory restarts at a document start: `token` (default) at the document's first token, inside
    a sequence chunk too, exactly as if the document ran alone (the memory op gets the positions); `chunk` only
    before a sequence chunk that begins with a document (documents starting inside a chunk carry the previous
    one's memory); `none` never. Attention is never reset (packed training without document masks)."""
    max_skipped_in_a_row: int = 10
    """A step whose loss or gradient norm is not finite is skipped; this many in a row stop the run."""
    seed: int = 1337
    """Seed for parameters, data order and every RNG (Lightning's seed_everything)."""
    val_at_start: bool = True
    """Evaluate on the validation split once before the first step, so the logs show where the loss started."""
    init_from: Optional[str] = None
    """A checkpoint (any format `fit` writes) whose model weights a *new* run starts from; its optimiser, schedule,
    step and data position are not used (a later stage, e.g. long-window training after 4K pre-training). The
    model config must match the checkpoint's. Ignored when the run resumes from its own checkpoint."""

    def __post_init__(self):
        _check(self.init_from is None or bool(self.init_from), "train.init_from", "must be a checkpoint path or null")
        _check(self.tbptt_chunks >= 0, "train.tbptt_chunks", f"must be >= 0 (0 = n_chunks), got {self.tbptt_chunks}")
        _check(self.reset_memory in RESET_MEMORY, "train.reset_memory",
               f"must be one of {', '.join(RESET_MEMORY)}, got {self.reset_memory!r}")
        _check(self.accumulate_windows >= 1, "train.accumulate_windows", f"must be >= 1, got {self.accumulate_windows}")
        _check(self.max_skipped_in_a_row >= 1, "train.max_skipped_in_a_row", "must be >= 1")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warmup, then cosine)."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final lr = lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Linear warmup, in optimiser steps."""
    decay_steps: Optional[int] = None
    """Cosine reaches min_lr here (optimiser steps); null = trainer.max_steps."""
    weight_decay: float = 0.1
    """Not applied to norms, biases, embeddings."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 = no clipping (the norm is still logged)."""

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings."""

    accelerator: str = "auto"
    """`auto`, `cpu` or `gpu`."""
    devices: Any = "auto"
    """Devices per node: an int or `auto`."""
    num_nodes: int = 1
    """Machines; `titans-train launch slurm` sets it from --nodes."""
    strategy: str = "auto"
    """auto | ddp | fsdp (FSDP2) | deepspeed_stage_2 | deepspeed_stage_3 (GPU); see strategies.py."""
    precision: str = "auto"
    """auto = bf16-mixed on GPU (memory math stays fp32), 32-true on CPU; or a Lightning value."""
    matmul_precision: str = "high"
    """CUDA only: torch.set_float32_matmul_precision for the fp32 matmuls/convs left under bf16 autocast (the
    memory op's, fp32 runs): `high` lets them use TF32 tensor cores (Lightning's advice on Ampere and later),
    `highest` keeps full fp32, `medium` allows bf16. CPU runs are never changed."""
    max_steps: int = 1000
    """Optimiser steps."""
    val_every_steps: int = 200
    """Validate every this many optimiser steps."""
    log_every_steps: int = 10
    """Write training metrics every this many optimiser steps."""
    deterministic: bool = False
    """PyTorch deterministic algorithms (slower; used by the resume test)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (less memory, ~1/3 more compute); any strategy."""
    fsdp_cpu_offload: bool = False
    """Strategy fsdp: parameters, gradients and optimiser state in host memory."""
    deepspeed_config: Optional[str] = None
    """Strategy deepspeed_*: JSON merged over the config derived from the recipe."""

    def __post_init__(self):
        _check(self.strategy in STRATEGIES, "trainer.strategy", f"must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        _check(self.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.matmul_precision in ("highest", "high", "medium"), "trainer.matmul_precision",
               f"must be highest, high or medium; got {self.matmul_precision!r}")
        _check(self.val_every_steps >= 1, "trainer.val_every_steps", "must be >= 1")
        _check(self.log_every_steps >= 1, "trainer.log_every_steps", "must be >= 1")


@dataclass
class LoggingConfig:
    """Where the run writes, and W&B."""

    run_name: str = "titans"
    """The run's name: its directory under runs/ and its W&B name."""
    out_dir: Optional[str] = None
    """CSV logs, W&B files and (by default) checkpoints; null = runs/<run_name>."""
    wandb: Union[str, bool] = "auto"
    """auto (online with an API key, else offline) | online | offline | off (YAML's bare off/false/true work too)."""
    project: str = "titans-train"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); null: the API key's default."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""

    def __post_init__(self):
        if isinstance(self.wandb, bool):
            self.wandb = "auto" if self.wandb else "off"
        _check(self.wandb in ("auto", "online", "offline", "off"), "logging.wandb",
               f"must be one of auto, online, offline, off; got {self.wandb!r}")


@dataclass
class CheckpointConfig:
    """Checkpoints: atomic writes, rotation, automatic resume."""

    dir: Optional[str] = None
    """Directory of the checkpoints; null = <logging.out_dir>/checkpoints."""
    every_steps: int = 500
    """Optimiser steps between checkpoints (and one at the end)."""
    keep_last_k: int = 3
    """Older periodic checkpoints are deleted; 0 = keep all."""
    resume: str = "auto"
    """auto (newest valid checkpoint in dir, if any) | none | a checkpoint path (file or directory)."""
    sharded: bool = True
    """Under trainer.strategy=fsdp: each rank writes its own shards into a step-*.ckpt directory
    (torch.distributed.checkpoint; resumes on any number of processes; `export` consolidates it). false: gather
    the whole state into one file on rank 0 (it must fit in that host's memory). Other strategies have one format:
    a file (single device, ddp), a DeepSpeed directory (deepspeed_stage_2/3)."""

    def __post_init__(self):
        _check(self.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
        _check(self.keep_last_k >= 0, "checkpoint.keep_last_k", "must be >= 0 (0 = keep all)")


@dataclass
class LaunchConfig:
    """Cluster launch (SLURM); used by `titans-train launch`."""

    partition: Optional[str] = None
    """sbatch --partition (the CLI's --partition wins)."""
    account: Optional[str] = None
    """sbatch --account (the CLI's --account wins)."""
    time: str = "24:00:00"
    """sbatch --time; a requeued job starts a new allocation of this length."""
    cpus_per_task: int = 8
    """CPU cores per rank (data workers + the main process)."""
    global_batch: Optional[int] = None
    """Windows per optimiser step over all ranks; when set, `launch` derives data.batch_size = global_batch /
    (nodes x gpus_per_node x train.accumulate_windows) and refuses a world size that does not divide it."""
    signal_seconds: int = 120
    """SLURM sends SIGUSR1 this long before the time limit: save, exit, requeue."""
    log_dir: str = "slurm_logs"
    """<log_dir>/<job name>-<job id>.out, appended across requeues."""
    setup: str = ""
    """Shell lines run before srun on the first node (module load, source .venv/bin/activate)."""
    sbatch_extra: list[str] = field(default_factory=list)
    """More `#SBATCH` options, e.g. ["--exclusive"]."""

    def __post_init__(self):
        _check(self.cpus_per_task >= 1, "launch.cpus_per_task", "must be >= 1")
        _check(self.global_batch is None or self.global_batch >= 1, "launch.global_batch", "must be >= 1 or null")
        _check(self.signal_seconds >= 0, "launch.signal_seconds", "must be >= 0")

