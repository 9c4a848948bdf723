"""`titans-train validate RECIPE --ckpt PATH [key=value ...]`: validation loss/perplexity of a checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (its model must match the checkpoint's)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. data.val_batches=50")
    p.add_argument("--ckpt", required=True, help="checkpoint (step-*.ckpt: a file, or a sharded / DeepSpeed directory)")


def run(args: argparse.Namespace) -> int:
    from titans_train.cli import UserError
    from titans_train.train import build as B

    recipe, resolved = B.load_recipe(args.recipe, args.overrides)
    B.check_same_model(resolved["model"], B.checkpoint_meta(args.ckpt), args.ckpt)
    if not recipe.data.val_split:
        raise UserError("data.val_split is empty: the recipe has no validation split to evaluate on")
    B.ensure_data(recipe, prepare_builtin=False)

    import lightning as L

    model = B.build_model(recipe)
    B.load_model_weights(model, args.ckpt)  # consolidated on this one process, whatever wrote it
    lit = B.lit_module(recipe, resolved, model)
    B.apply_matmul_precision(recipe)
    trainer = L.Trainer(
        accelerator=recipe.trainer.accelerator,
        devices=1,
        precision=B.resolve_precision(recipe),
        logger=False,
        limit_val_batches=recipe.data.val_batches if recipe.data.val_batches is not None else 1.0,
        inference_mode=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.validate(lit, datamodule=B.build_datamodule(recipe), verbose=False)
    m = trainer.callback_metrics
    chunks = sorted(k for k in m if k.startswith("val/loss_chunk/"))
    print(f"val/loss {float(m['val/loss']):.4f}  val/ppl {float(m['val/ppl']):.2f}")
    if chunks:
        print("val loss by chunk: " + " ".join(f"{float(m[k]):.3f}" for k in chunks))
    return 0
