"""`titans-train fit [RECIPE] [key=value ...]`: train a model from a recipe, resuming automatically.

Without a recipe it trains the tiny default (`recipes/tiny.yaml`) on the built-in corpus, preparing the corpus
first if needed. Reads top to bottom: recipe, data, model, resume point, loggers, callbacks, trainer, fit.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe YAML (default: recipes/tiny.yaml, the tiny model on the built-in corpus)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. trainer.max_steps=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="build everything, run one optimiser step (no checkpoint, no logs), and exit")


def run(args: argparse.Namespace) -> int:
    from titans_train.cli import UserError
    from titans_train.train import build as B

    recipe_path, overrides = B.split_recipe_args(args.recipe, args.overrides)
    recipe, resolved = B.load_recipe(recipe_path, overrides)
    yaml_text = B.recipe_yaml(resolved)
    if args.print_config:
        print(yaml_text, end="")
        return 0

    import lightning as L

    from titans_train.train.callbacks.preemption import REQUEUE_EXIT, Preemption
    from titans_train.train.module import TrainingDiverged

    L.seed_everything(recipe.train.seed, workers=True, verbose=False)
    # The default run and the tiny recipes (data.path = data/builtin) need no setup: the corpus is prepared there.
    B.ensure_data(recipe, prepare_builtin=recipe_path == str(B.DEFAULT_RECIPE) or recipe.data.path == B.BUILTIN_DATA)
    model = B.build_model(recipe)
    datamodule = B.build_datamodule(recipe)

    ckpt_path, run_id = None, None
    if not args.dry_run:
        ckpt_path = B.resume_path(recipe)
        B.refuse_mixing_runs(recipe, ckpt_path)
        if ckpt_path is not None:
            meta = B.checkpoint_meta(ckpt_path)
            B.check_same_model(resolved["model"], meta, ckpt_path)
            run_id = meta.get("wandb_run_id")
            print(f"resuming from {ckpt_path}", flush=True)

    if ckpt_path is None and recipe.train.init_from:  # a new stage: weights from an earlier run, all else fresh
        B.init_from_checkpoint(recipe, resolved, model)
        print(f"initialised the model from {recipe.train.init_from}", flush=True)
    lit = B.lit_module(recipe, resolved, model)
    trainer = build_trainer(recipe, yaml_text, resolved, lit, run_id=run_id, dry_run=args.dry_run,
                            fresh=ckpt_path is None)
    if ckpt_path is not None:  # its format (file, sharded or DeepSpeed directory) suits the strategy and world size
        B.check_resumable(recipe, ckpt_path, trainer.world_size)
    try:
        trainer.fit(lit, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except TrainingDiverged as e:
        raise UserError(str(e)) from None
    preempted = next((cb.stopped_at for cb in trainer.callbacks if isinstance(cb, Preemption)), None)
    if preempted is not None:
        print(f"stopped by a signal after step {preempted}, checkpoint saved in {recipe.ckpt_dir()}; run the same "
              f"command again to resume (exit code {REQUEUE_EXIT} asks the sbatch script to requeue)", flush=True)
        return REQUEUE_EXIT
    if args.dry_run:
        stats = lit.step_stats
        print(f"dry run ok: 1 step, loss {stats.loss:.4f}, grad norm {stats.grad_norm:.3g}" if stats else "dry run ok")
    else:
        _print_summary(trainer, recipe)
    return 0


def build_trainer(recipe, yaml_text: str, resolved: dict, lit, *, run_id, dry_run: bool, fresh: bool):
    import lightning as L

    from titans_train.train import build as B
    from titans_train.train.callbacks import ChunkLoss, PeakMemory, StepProgressBar, Throughput
    from titans_train.train.callbacks.preemption import Preemption
    from titans_train.train.checkpoint import AtomicCheckpointIO, PeriodicCheckpoint
    from titans_train.train.loggers import build_loggers
    from titans_train.train.strategies import build_strategy, cluster_plugins

    t, accum = recipe.trainer, recipe.train.accumulate_windows
    log_every = t.log_every_steps
    callbacks = [StepProgressBar(), Throughput(log_every), ChunkLoss(log_every), PeakMemory(log_every)]
    if dry_run:
        loggers = False
        max_steps, val_batches, sanity = 1, 1, 0
    else:
        loggers, run_id = build_loggers(recipe, resolved, run_id, out_dir=recipe.out_dir())
        lit.wandb_run_id = run_id
        callbacks.append(PeriodicCheckpoint(recipe.ckpt_dir(), recipe.checkpoint.every_steps,
                                            recipe.checkpoint.keep_last_k, yaml_text))
        callbacks.append(Preemption())  # SIGUSR1/SIGTERM: save at the step's end, stop, exit for requeue
        if recipe.eval.every_steps:
            callbacks.append(eval_callback(recipe))
        max_steps = t.max_steps
        val_batches = recipe.data.val_batches if recipe.data.val_batches is not None else 1.0
        sanity = 0
        if fresh and recipe.train.val_at_start and recipe.data.val_split:
            sanity = recipe.data.val_batches if recipe.data.val_batches is not None else -1
    has_val = bool(recipe.data.val_split)
    B.apply_matmul_precision(recipe)
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(recipe, precision=B.resolve_precision(recipe)),
        precision=B.resolve_precision(recipe),
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=t.val_every_steps * accum if has_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=(val_batches if has_val else 0),
        num_sanity_val_steps=sanity,
        log_every_n_steps=log_every,
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        deterministic=t.deterministic,
        inference_mode=False,  # validation runs the memory update, which may use autograd internally
        use_distributed_sampler=False,  # the data module splits the stream by rank itself
        enable_model_summary=False,
        enable_checkpointing=not dry_run,
        default_root_dir=recipe.out_dir(),
    )


def eval_callback(recipe):
    """The `eval:` section's callback; it needs whole weights on rank 0 and prompts that fit the model."""
    from titans_train.cli import UserError
    from titans_train.train.callbacks.eval import EvalDuringFit

    if recipe.trainer.strategy in ("fsdp", "deepspeed_stage_3"):
        raise UserError(f"eval.every_steps={recipe.eval.every_steps} runs on rank 0 with whole weights, which "
                        f"trainer.strategy={recipe.trainer.strategy} shards: set eval.every_steps=0 and evaluate "
                        "checkpoints with `titans-train eval`")
    from titans_train.data.shards import Manifest

    Manifest(recipe.data.path).shards(recipe.eval.split)  # a missing split is an error now, not at step N
    window = recipe.eval.window or recipe.data.n_chunks * recipe.data.chunk_len
    return EvalDuringFit(recipe.eval, recipe.data.path, recipe.data.tokenizer, window)


def _print_summary(trainer, recipe) -> None:
    m = trainer.callback_metrics
    parts = [f"step {trainer.global_step}"]
    for key in ("train/loss", "val/loss", "val/ppl"):
        if key in m:
            parts.append(f"{key} {float(m[key]):.4f}")
    print("done: " + ", ".join(parts) + f"; checkpoints in {recipe.ckpt_dir()}, logs in {recipe.out_dir()}")
