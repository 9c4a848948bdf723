"""Building the pieces the commands share: recipe, data, model, Lightning module, trainer; checkpoint checks.

Everything the user can get wrong raises `titans_train.cli.UserError` with one line saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from titans_train.cli import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = REPO_ROOT / "recipes"
DEFAULT_RECIPE = RECIPES / "tiny.yaml"
BUILTIN_DATA = "data/builtin"  # where the tiny recipes read the built-in corpus (prepared there when missing)


def split_recipe_args(recipe: str | None, overrides: list[str]) -> tuple[str, list[str]]:
    """`fit model.dim=64` (no recipe, overrides only) -> the default recipe with that override."""
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        return str(DEFAULT_RECIPE), [recipe, *overrides]
    return (recipe or str(DEFAULT_RECIPE)), list(overrides)


def load_recipe(path: str, overrides: list[str]):
    """(Recipe, resolved dict); any problem with the file, a key or a value is a UserError."""
    from titans_train.config import load

    if not Path(path).is_file():
        raise UserError(f"recipe {path} not found (recipes live in {RECIPES})")
    try:
        return load(path, overrides)
    except ValueError as e:
        raise UserError(str(e)) from None


def recipe_yaml(resolved: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(resolved))


def ensure_data(recipe, *, prepare_builtin: bool) -> None:
    """Make sure `data.path` holds a prepared dataset; with `prepare_builtin`, prepare the built-in corpus there."""
    path = Path(recipe.data.path)
    manifest = path if path.suffix == ".json" else path / "manifest.json"
    if manifest.is_file():
        check_vocab(recipe)
        return
    cmd = f"titans-train prepare builtin --out {path}"
    if not prepare_builtin:
        raise UserError(f"data.path={path} holds no prepared dataset ({manifest} not found): run `{cmd}` "
                        "(or prepare your own text) first, or set data.path")
    print(f"preparing the built-in corpus into {path} (once) ...", flush=True)
    import subprocess
    import sys

    # A child process: prepare's worker pool must leave nothing behind in the training process (run in-process,
    # it left training several times slower).
    code = "import sys; from titans_train.cli import main; sys.exit(main())"
    rc = subprocess.run([sys.executable, "-c", code, "prepare", "builtin", "--out", str(path)]).returncode
    if rc != 0 or not manifest.is_file():
        raise UserError(f"preparing the built-in corpus failed; try `{cmd}` yourself")


def check_vocab(recipe) -> None:
    """The model's embedding must have a row for every token id the prepared data can contain."""
    from titans_train.data.shards import Manifest

    vocab = Manifest(recipe.data.path).tokenizer["vocab_size"]
    if vocab > recipe.model.vocab_size:
        raise UserError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the vocabulary of the tokenizer "
                        f"that prepared data.path={recipe.data.path} ({vocab}): set model.vocab_size={vocab} or more")


def tokenizer_for(recipe):
    from titans_train.data.shards import Manifest

    return Manifest(recipe.data.path).load_tokenizer(recipe.data.tokenizer)


def build_model(recipe):
    from titans_train.models import build_model as _build

    try:
        return _build(recipe.model)
    except ValueError as e:
        raise UserError(str(e)) from None


def build_datamodule(recipe):
    from titans_train.data.datamodule import TitansDataModule

    return TitansDataModule(recipe.data)


def resolve_precision(recipe) -> str:
    p = recipe.trainer.precision
    if p != "auto":
        return p
    import torch

    gpu = torch.cuda.is_available() and recipe.trainer.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"


def apply_matmul_precision(recipe) -> None:
    """trainer.matmul_precision on CUDA runs (TF32 for fp32 matmuls and cuDNN convs unless `highest`)."""
    import torch

    if torch.cuda.is_available() and recipe.trainer.accelerator in ("auto", "gpu", "cuda"):
        torch.set_float32_matmul_precision(recipe.trainer.matmul_precision)
        torch.backends.cudnn.allow_tf32 = recipe.trainer.matmul_precision != "highest"


def resume_path(recipe) -> Path | None:
    """The checkpoint `checkpoint.resume` asks for: auto = newest valid in the checkpoint dir; none; a path."""
    from titans_train.train.checkpoint import is_valid, newest_valid

    r = recipe.checkpoint.resume
    if r == "none":
        return None
    if r == "auto":
        return newest_valid(recipe.ckpt_dir())
    p = Path(r)
    if not p.exists():
        raise UserError(f"checkpoint.resume={r}: no such file or directory (use auto, none or a checkpoint path)")
    if not is_valid(p):
        raise UserError(f"checkpoint.resume={r} is not a complete titans-train checkpoint")
    return p


def check_resumable(recipe, ckpt_path, world_size: int) -> None:
    """The recipe's strategy can load this checkpoint's format on `world_size` processes (else a UserError):
    a sharded directory needs fsdp (any number of processes); a DeepSpeed directory needs a DeepSpeed strategy on
    as many processes as wrote it; a file loads under every strategy but DeepSpeed."""
    from titans_train.train.checkpoint import checkpoint_format, saved_world_size

    strategy = recipe.trainer.strategy
    deepspeed = strategy.startswith("deepspeed")
    fmt = checkpoint_format(ckpt_path)
    if fmt == "sharded" and strategy != "fsdp":
        raise UserError(f"{ckpt_path} is a sharded (fsdp) checkpoint: resume it with trainer.strategy=fsdp (on any "
                        f"number of devices), or `titans-train export` its weights; got trainer.strategy={strategy}")
    if fmt == "deepspeed" and not deepspeed:
        raise UserError(f"{ckpt_path} is a DeepSpeed checkpoint: resume it with trainer.strategy=deepspeed_stage_2/3, "
                        f"or `titans-train export` its weights; got trainer.strategy={strategy}")
    if fmt == "file" and deepspeed:
        raise UserError(f"{ckpt_path} is a single-file checkpoint, which trainer.strategy={strategy} cannot resume: "
                        "resume it with ddp or fsdp")
    saved = saved_world_size(ckpt_path) if fmt == "deepspeed" else None
    if saved is not None and saved != world_size:
        raise UserError(f"{ckpt_path} was written by {saved} DeepSpeed ranks and this run has {world_size}: DeepSpeed "
                        f"resumes on the same number of devices (set the devices to give {saved} processes)")


def refuse_mixing_runs(recipe, resume) -> None:
    """A fresh run must not write (and rotate away) checkpoints in a directory that holds another run's."""
    from titans_train.train.checkpoint import list_checkpoints

    if resume is None and list_checkpoints(recipe.ckpt_dir()):
        why = "none of them is readable" if recipe.checkpoint.resume == "auto" else "checkpoint.resume=none"
        raise UserError(f"checkpoint.dir {recipe.ckpt_dir()} already holds checkpoints and {why}: set another "
                        "logging.run_name / checkpoint.dir for a new run (nothing was deleted)")


def checkpoint_meta(path: str | os.PathLike) -> dict:
    from titans_train.train.checkpoint import read_meta

    try:
        return read_meta(path)
    except ValueError as e:  # a directory that is no checkpoint, a missing path: the message says which
        raise UserError(str(e)) from None
    except Exception as e:
        raise UserError(f"{path} is not a readable titans-train checkpoint ({type(e).__name__}: {e})") from None


def check_same_model(recipe_model: dict, ckpt_meta: dict, ckpt_path) -> None:
    """A checkpoint from another model config is an error naming the keys that differ."""
    saved = (ckpt_meta.get("recipe") or {}).get("model")
    if saved is None:
        raise UserError(f"{ckpt_path} has no recipe inside: not a titans-train checkpoint")
    diffs = _diff(saved, recipe_model, "model")
    if diffs:
        shown = "; ".join(f"{k}: checkpoint {a!r}, recipe {b!r}" for k, a, b in diffs[:4])
        more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise UserError(f"{ckpt_path} was trained with another model config: {shown}{more}. Use the matching recipe, "
                        "or a new checkpoint.dir / checkpoint.resume=none to start afresh")


def _diff(a, b, prefix):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [(prefix, a, b)]


def lit_module(recipe, resolved: dict, model):
    from titans_train.train.module import TitansLitModule

    return TitansLitModule(model, resolved, recipe.train, _optim_with_decay(recipe), recipe.data.chunk_len)


def _optim_with_decay(recipe):
    import dataclasses

    return dataclasses.replace(recipe.optim, decay_steps=recipe.decay_steps())


def checkpoint_weights(path: str | os.PathLike) -> dict:
    """The LightningModule state dict of a checkpoint of any format, whole, on this one process."""
    from titans_train.train.checkpoint import load_weights

    if not Path(path).exists():
        raise UserError(f"checkpoint {path} not found")
    try:
        return load_weights(path)
    except ValueError as e:
        raise UserError(str(e)) from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def model_weights(path: str | os.PathLike) -> dict:
    """The model's state dict (keys without the LightningModule's `model.` prefix) of a checkpoint of any format."""
    weights = checkpoint_weights(path)
    return {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}


def load_model_weights(model, path: str | os.PathLike) -> None:
    """Load a checkpoint's model weights into `model`. Weights whose names do not fit this version's model (a
    checkpoint from a titans-train version with another architecture, e.g. MAC before its `memory_norm`) are a
    one-line error naming them, not a raw load_state_dict traceback."""
    result = model.load_state_dict(model_weights(path), strict=False)
    if result.missing_keys or result.unexpected_keys:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        what = "; ".join(f"{name} {few(keys)}" for name, keys in (("missing", result.missing_keys),
                                                                  ("unexpected", result.unexpected_keys)) if keys)
        raise UserError(f"{path}: its weights do not fit this version's model ({what}): it was written by a "
                        "titans-train version with another architecture; load it with that version, or retrain")


def init_from_checkpoint(recipe, resolved: dict, model) -> None:
    """`train.init_from`: load a checkpoint's model weights into `model` (same model config), nothing else."""
    path = recipe.train.init_from
    if not Path(path).exists():
        raise UserError(f"train.init_from={path}: no such checkpoint (train the earlier stage first, or set the path)")
    check_same_model(resolved["model"], checkpoint_meta(path), path)
    load_model_weights(model, path)


def load_model_from_checkpoint(ckpt_path: str | os.PathLike, overrides: list[str] | None = None):
    """(Recipe, resolved dict, model with the checkpoint's weights) from a checkpoint alone (file, sharded or
    DeepSpeed directory)."""
    from titans_train.config import recipe_config

    if not Path(ckpt_path).exists():
        raise UserError(f"checkpoint {ckpt_path} not found")
    resolved = checkpoint_meta(ckpt_path).get("recipe")
    if resolved is None:
        raise UserError(f"{ckpt_path} has no recipe inside: not a titans-train checkpoint")
    recipe = recipe_config(resolved)
    model = build_model(recipe)
    load_model_weights(model, ckpt_path)
    return recipe, resolved, model
