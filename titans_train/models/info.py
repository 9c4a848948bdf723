"""`titans-train info RECIPE [key=value ...] [--json]`: what a recipe builds, without allocating it.

The model is built on the meta device; prints the variant, the layer/dim/head/memory settings, the parameter count
(total and without the embedding table) and the training FLOPs per token at the training length.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/mag_170m.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. model.n_layers=4")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default model.max_seq_len)")


def describe(recipe: str, overrides: list[str], seq_len: int | None = None) -> dict:
    """The facts `info` prints, as a dict (raises ValueError on a bad recipe)."""
    import torch

    from titans_train.config import load_recipe, model_config
    from titans_train.models.lm import build_model

    cfg = model_config(load_recipe(recipe, overrides))
    with torch.device("meta"):
        model = build_model(cfg)
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    out = {
        "recipe": recipe,
        "variant": cfg.variant,
        "n_layers": cfg.n_layers,
        "dim": cfg.dim,
        "heads": cfg.heads,
        "mlp_hidden": cfg.mlp_hidden_size(),
        "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_seq_len,
        "n_params": model.count_params(),
        "n_params_non_embedding": model.count_params(non_embedding=True),
        "flops_per_token": model.flops_per_token(seq_len),
        "flops_seq_len": seq_len,
    }
    if cfg.variant != "transformer":
        m = cfg.memory
        out["memory"] = {"heads": cfg.memory_heads(), "head_dim": cfg.dim // cfg.memory_heads(), "depth": m.depth,
                         "expansion": m.expansion, "chunk_size": m.chunk_size, "channel_alpha": m.channel_alpha}
    if cfg.variant in ("mag", "mal") or (cfg.variant == "transformer" and cfg.window is not None):
        out["window"] = cfg.window
    if cfg.variant != "lmm":
        out["n_persistent"] = cfg.n_persistent
    if cfg.variant == "mac":
        out["segment_len"] = cfg.segment_len
        out["mac_memory_tokens"] = cfg.mac_memory_tokens
    return out


def run(args: argparse.Namespace) -> int:
    from titans_train.cli import UserError

    try:
        facts = describe(args.recipe, args.overrides, args.seq_len)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(facts))
        return 0
    for key, value in facts.items():
        if key == "memory":
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif key.startswith("n_params"):
            value = f"{value:,} ({value / 1e6:.1f}M)"
        elif key == "flops_per_token":
            value = f"{value:.4g} (training: forward + backward, at seq_len {facts['flops_seq_len']})"
        if key != "flops_seq_len":
            print(f"{key:<24}{value}")
    return 0
