"""Scale-out from the recipe: `trainer.strategy` -> what `lightning.Trainer(strategy=...)` takes.

    auto, ddp, ddp_spawn  Lightning's own (one process per device, gradients all-reduced).
    fsdp                  FSDP2: `fully_shard` on every block, then on the model, through Lightning's
                          `ModelParallelStrategy` (the LightningModule's `configure_model` calls `parallelize`).
                          On GPU the policy is bf16 parameters / fp32 gradient reduction; `trainer.fsdp_cpu_offload`
                          keeps parameters, gradients and optimiser state in host memory. Checkpoints are
                          sharded: every rank writes its own shards into one torch.distributed.checkpoint
                          directory (no rank gathers the whole state), which resumes on any number of processes;
                          `checkpoint.sharded=false` gathers one full file on rank 0 instead.
    deepspeed_stage_2/3   Lightning's `DeepSpeedStrategy` (GPU only) with a config derived from the recipe
                          (`deepspeed_config`), where `trainer.deepspeed_config` (a JSON file) overrides keys.
                          Checkpoints are DeepSpeed's directories (per-rank ZeRO partitions).

Directory checkpoints are written under a hidden temporary name and renamed once every rank has finished
(`checkpoint.save_directory_atomically`), like the files of the other strategies; see `checkpoint.py`.

`trainer.activation_checkpointing` recomputes each block's activations in backward, under any strategy.

Why the memory's initial fast weights are not sharded: the streaming state is built from them (`init_state`)
and rows are reset to them between sequence chunks, outside the block's forward where FSDP2 gathers a block's
parameters. So they are left out of the sharding (`ignored_params`; they are small: heads x D x 4D per memory
layer), stay plain replicated tensors, and their gradients are averaged over the ranks in `clip_grad_norm`,
once per optimiser step, before the norm is taken.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy  # no deepspeed import here
from torch import Tensor, nn

from titans_train.train.config import STRATEGIES

GPU_ONLY = ("deepspeed_stage_2", "deepspeed_stage_3")


def check_strategy(recipe, has_gpu: bool | None = None) -> list[str]:
    """Problems with the recipe's strategy on this accelerator (empty when fine); each names the keys."""
    t = recipe.trainer
    problems = []
    if t.strategy not in STRATEGIES:
        problems.append(f"trainer.strategy={t.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if t.strategy in GPU_ONLY:
        if has_gpu is None:
            has_gpu = torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda")
        if not has_gpu or t.accelerator == "cpu":
            problems.append(f"trainer.strategy={t.strategy} needs GPUs (Lightning's DeepSpeed strategy does not run on "
                            "CPU); use ddp or fsdp here")
    if t.fsdp_cpu_offload and t.strategy != "fsdp":
        problems.append(f"trainer.fsdp_cpu_offload=true needs trainer.strategy=fsdp (got {t.strategy})")
    if t.deepspeed_config and t.strategy not in GPU_ONLY:
        problems.append(f"trainer.deepspeed_config is set but trainer.strategy={t.strategy} is not a DeepSpeed one")
    if t.deepspeed_config and not Path(t.deepspeed_config).is_file():
        problems.append(f"trainer.deepspeed_config={t.deepspeed_config}: no such file")
    if t.strategy in GPU_ONLY and not recipe.checkpoint.sharded:
        problems.append(f"checkpoint.sharded=false: trainer.strategy={t.strategy} always writes DeepSpeed's sharded "
                        "directories (export consolidates them)")
    return problems


def build_strategy(recipe, *, precision: str):
    """The `strategy=` argument of `lightning.Trainer` for this recipe (a name or a Strategy object); a strategy
    that cannot run here is a UserError naming the key."""
    from titans_train.cli import UserError

    problems = check_strategy(recipe)
    if problems:
        raise UserError("; ".join(problems))
    name = recipe.trainer.strategy
    if name == "fsdp":
        return FSDP2Strategy(cpu_offload=recipe.trainer.fsdp_cpu_offload, bf16=precision.startswith("bf16"),
                             sharded_checkpoint=recipe.checkpoint.sharded)
    if name in GPU_ONLY:
        return AtomicDeepSpeedStrategy(config=deepspeed_config(recipe, precision=precision))
    if name in ("ddp", "ddp_spawn") or (name == "auto" and _several_devices(recipe)):
        from lightning.pytorch.strategies import DDPStrategy

        # Truncated backprop skips the gradient all-reduce on a window's non-final backwards; the final one
        # then does not reach the parameters used only before the last truncation point (e.g. the memory's
        # initial weights), which DDP must be told about. Their locally accumulated gradients are reduced then.
        return DDPStrategy(find_unused_parameters=_truncates(recipe),
                           start_method="spawn" if name == "ddp_spawn" else "popen")
    return name


def _truncates(recipe) -> bool:
    k = recipe.train.tbptt_chunks
    return 0 < k < recipe.data.n_chunks


def _several_devices(recipe) -> bool:
    t = recipe.trainer
    if t.num_nodes > 1:
        return True
    if isinstance(t.devices, int):
        return t.devices > 1
    if isinstance(t.devices, (list, tuple)):
        return len(t.devices) > 1
    if t.devices == "auto" and t.accelerator in ("auto", "gpu", "cuda"):
        return torch.cuda.device_count() > 1
    return False


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its own requeue handler (ours saves our checkpoint
    and the sbatch script requeues; see `callbacks/preemption.py` and launch/README.md)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


# --- FSDP2 ---------------------------------------------------------------------------------------------------------


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as pure data parallelism: every rank in one data-parallel group (no tensor
    parallelism). Carries the FSDP2 options that `parallelize` applies.

    Checkpoints: with `sharded_checkpoint` Lightning's distributed checkpoint (a DCP directory of every rank's
    shards plus `meta.pt`), written atomically; otherwise full state dicts gathered into one file on rank 0
    (written by the trainer's CheckpointIO, atomic too). Loading takes either (Lightning tells them apart), and
    DCP reshards a directory onto however many ranks load it."""

    def __init__(self, cpu_offload: bool = False, bf16: bool = False, sharded_checkpoint: bool = True, **kwargs):
        super().__init__(save_distributed_checkpoint=sharded_checkpoint, **kwargs)
        self.cpu_offload, self.bf16 = cpu_offload, bf16

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from titans_train.train.checkpoint import save_directory_atomically

        parent = super()
        save_directory_atomically(self, filepath, lambda tmp: parent.save_checkpoint(checkpoint, tmp, storage_options))

    def setup_environment(self) -> None:
        # All ranks shard the model among themselves (Lightning's default splits nodes x devices into data x
        # tensor parallel).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def is_fsdp2(strategy) -> bool:
    return isinstance(strategy, FSDP2Strategy)


def configure_model(lit) -> None:
    """The LightningModule's `configure_model`: activation checkpointing, then FSDP2 sharding under `fsdp`.
    Idempotent (Lightning calls the hook again for validate after fit)."""
    if getattr(lit, "_titans_configured", False):
        return
    trainer_cfg = (lit.recipe or {}).get("trainer", {})
    if trainer_cfg.get("activation_checkpointing"):
        checkpoint_blocks(lit.model)
    strategy = lit.trainer.strategy
    if is_fsdp2(strategy):
        parallelize(lit.model, strategy.device_mesh["data_parallel"], cpu_offload=strategy.cpu_offload,
                    bf16=strategy.bf16 and strategy.root_device.type == "cuda")
    lit._titans_configured = True


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that must stay whole on every rank: the memory's initial fast weights (see module docstring)."""
    from titans_train.layers.neural_memory import NeuralMemory

    out = []
    for m in model.modules():
        if isinstance(m, NeuralMemory):
            out += list(m.init_weights)
    return out


def parallelize(model: nn.Module, mesh, *, cpu_offload: bool = False, bf16: bool = False) -> nn.Module:
    """FSDP2: shard each block, then the rest (embedding, final norm, head) at the root; in place."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": mesh}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    keep = set(replicated_params(model))
    for block in model.blocks:
        fully_shard(block, ignored_params={p for p in block.parameters() if p in keep}, **kw)
    fully_shard(model, ignored_params=keep, **kw)
    for p in keep:
        p._titans_replicated = True
    return model


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute every block's activations during backward (non-reentrant `torch.utils.checkpoint`).

    The block's `forward` is wrapped on the instance, so parameter names (and checkpoints) do not change and
    FSDP2's hooks on the block still gather its parameters around the recomputation."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        if getattr(block, "_titans_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._titans_checkpointed = True


def clip_grad_norm(lit, max_norm: float) -> Tensor:
    """Global gradient norm (a plain tensor) after clipping to `max_norm` (inf: no clipping), on any strategy.

    Under FSDP2, gradients of sharded parameters are DTensor shards (squares summed over ranks); the
    replicated memory initial weights are averaged over the ranks here first. Under DeepSpeed the engine
    clips inside its step (`gradient_clipping` in its config) and holds the gradients: the norm is the one it
    measured at its last step."""
    strategy = lit.trainer.strategy
    params = [p for p in lit.model.parameters() if p.grad is not None]
    if isinstance(strategy, DeepSpeedStrategy):
        norm = getattr(strategy.deepspeed_engine, "get_global_grad_norm", lambda: None)()
        return torch.tensor(0.0 if norm is None else float(norm))
    if not is_fsdp2(strategy):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    group = strategy.device_mesh["data_parallel"].get_group()
    world = dist.get_world_size(group)
    sharded = [p.grad for p in params if isinstance(p.grad, DTensor)]
    plain = [p.grad for p in params if not isinstance(p.grad, DTensor)]
    if plain and world > 1:  # the replicated parameters: average their gradients (one collective)
        flat = torch.cat([g.reshape(-1) for g in plain])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for g in plain:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
    dev = plain[0].device if plain else (sharded[0].to_local().device if sharded else torch.device("cpu"))
    sq = torch.zeros((), dtype=torch.float32, device=dev)
    for g in sharded:
        sq += g.to_local().float().pow(2).sum().to(dev)
    if world > 1:
        dist.all_reduce(sq, group=group)
    for g in plain:
        sq += g.float().pow(2).sum()
    total = sq.sqrt()
    coef = float(max_norm / (total + 1e-6))
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total.cpu()


# --- DeepSpeed -----------------------------------------------------------------------------------------------------


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy whose checkpoint directories appear under their name only when complete."""

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        from titans_train.train.checkpoint import save_directory_atomically

        parent = super()
        save_directory_atomically(self, filepath, lambda tmp: parent.save_checkpoint(checkpoint, tmp, storage_options))


def deepspeed_config(recipe, *, precision: str = "bf16-mixed") -> dict:
    """DeepSpeed's config for `trainer.strategy=deepspeed_stage_{2,3}`, derived from the recipe; the JSON file
    `trainer.deepspeed_config` (if set) is merged on top, key by key (nested dicts merged, other values replaced).

    Optimiser, schedule and gradient accumulation stay ours (the LightningModule's AdamW and schedule; windows are
    accumulated by the module, so DeepSpeed sees one micro-step per optimiser step). DeepSpeed clips gradients
    (`gradient_clipping` = optim.grad_clip) inside its step."""
    t = recipe.trainer
    stage = 3 if t.strategy == "deepspeed_stage_3" else 2
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 200_000_000,
        "allgather_bucket_size": 200_000_000,
    }
    if stage == 3:
        # model-states files also hold whole 16-bit weights (export consolidates the fp32 shards itself)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": recipe.data.batch_size,
        "gradient_clipping": recipe.optim.grad_clip,
        "bf16": {"enabled": precision.startswith("bf16")},
        "fp16": {"enabled": precision.startswith("16")},
        "steps_per_print": 10 ** 9,  # our loggers report; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if t.deepspeed_config:
        try:
            user = json.loads(Path(t.deepspeed_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"trainer.deepspeed_config={t.deepspeed_config}: cannot read it as JSON ({e})") from None
        if not isinstance(user, dict):
            raise ValueError(f"trainer.deepspeed_config={t.deepspeed_config} must hold a JSON object")
        if "gradient_accumulation_steps" in user:
            raise ValueError(f"trainer.deepspeed_config={t.deepspeed_config} sets gradient_accumulation_steps: use "
                             "train.accumulate_windows instead (the module accumulates windows itself)")
        cfg = merge(cfg, user)
    return cfg


def merge(base: dict, over: dict) -> dict:
    """`base` with `over` merged in: nested dicts key by key, everything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
