"""Every recipe in recipes/ fits: `fit --dry-run` runs one optimiser step of each file on the built-in corpus.

- The tiny CPU recipes (`tiny.yaml`, `tiny_<variant>.yaml`) run as shipped (only data.path and logging.out_dir
  point into the test's directory).
- Every `<variant>_<scale>.yaml` resolves at full size, and runs with a tiny override of its dimensions
  (TINY_DIMS: width 64, one block, 64-token chunks; everything else - the variant, memory settings, heads, gate,
  persistent tokens, vocabulary - as the recipe says).
- Every long-window stage `long/*.yaml` composes its 4K recipe's model and starts from that recipe's
  checkpoints; it runs with TINY_DIMS but its own 16-chunk windows and truncation, with train.init_from=null
  (the dry run has no earlier stage to start from; the chain 4K -> long stage with a real checkpoint is
  `test_long_stage_continues_from_the_4k_checkpoint`). At their shipped dims the long tiny stages cost a
  minute each on 2 cores, too much for CI; `recipes/README.md` has their measured runs.
So no recipe is broken by construction."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from titans_train.cli import main
from titans_train.config import load

from tests.train_toy import one_thread as _one_thread_body


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from _one_thread_body()

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SIZE_RE = r"(lmm|mac|mag|mal|transformer)_\d+m\.yaml"
SIZED = sorted(p for p in RECIPES.glob("*.yaml") if re.fullmatch(SIZE_RE, p.name))
TINY = sorted(p for p in RECIPES.glob("tiny*.yaml") if not p.name.startswith("tiny_niah"))
NIAH = sorted(RECIPES.glob("tiny_niah_*.yaml"))  # passkey data; dry-run on the built-in corpus (same tokenizer)
MINI = sorted(RECIPES.glob("mini_*.yaml"))
LONG_SIZED = sorted(p for p in (RECIPES / "long").glob("*.yaml") if re.fullmatch(SIZE_RE, p.name))
LONG_TINY = sorted((RECIPES / "long").glob("tiny_*.yaml"))
TINY_DIMS = ["model.dim=64", "model.n_layers=1", "model.mlp_hidden=128", "model.max_seq_len=64", "model.n_persistent=4",
             "model.memory.chunk_size=8", "data.chunk_len=64", "data.n_chunks=2", "data.batch_size=2",
             "data.num_workers=0", "data.val_batches=1", "data.tokenizer=manifest"]


def test_every_recipe_file_is_covered():
    top = {p.name for p in RECIPES.glob("*.yaml")}
    assert top == {p.name for p in SIZED + TINY + NIAH + MINI}, sorted(top)
    assert len(SIZED) == 20 and len(TINY) == 6
    assert {p.name for p in LONG_SIZED} == {p.name for p in SIZED}, "one long-window stage per 4K recipe"
    assert {p.name for p in LONG_TINY} == {p.name for p in TINY if p.name != "tiny.yaml"}
    assert set((RECIPES / "long").glob("*.yaml")) == set(LONG_SIZED + LONG_TINY)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "builtin"
    assert main(["prepare", "builtin", "--out", str(out)]) == 0
    return out


def dry_run(recipe: Path, over: list[str], capsys) -> None:
    assert main(["fit", str(recipe), *over, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run ok: 1 step" in out, out[-2000:]


def tiny_dims(full) -> list[str]:
    over = list(TINY_DIMS)
    if full.model.window is not None:
        over.append("model.window=32")
    if full.model.variant == "mac":
        over += ["model.segment_len=32", "model.mac_memory_tokens=16"]
    return over


@pytest.mark.parametrize("recipe", SIZED, ids=[p.stem for p in SIZED])
def test_recipe_dry_run(recipe, data_dir, tmp_path, capsys):
    full, _ = load(recipe)  # full size: every section validates
    dry_run(recipe, [*tiny_dims(full), f"data.path={data_dir}", f"logging.out_dir={tmp_path}"], capsys)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("recipe", TINY, ids=[p.stem for p in TINY])
def test_tiny_recipe_dry_run_as_shipped(recipe, data_dir, tmp_path, capsys):
    recipe_obj, _ = load(recipe)
    assert recipe_obj.data.path == "data/builtin" and recipe_obj.trainer.max_steps == 300
    dry_run(recipe, [f"data.path={data_dir}", f"logging.out_dir={tmp_path}"], capsys)


@pytest.mark.parametrize("recipe", NIAH + MINI, ids=[p.stem for p in NIAH + MINI])
def test_niah_and_mini_recipes_dry_run(recipe, data_dir, tmp_path, capsys):
    """The passkey recipes (their data is `prepare passkey`'s; the dry run reads the built-in corpus, same byte
    tokenizer) and the quality benchmark's mini recipes, as shipped otherwise."""
    dry_run(recipe, [f"data.path={data_dir}", f"logging.out_dir={tmp_path}", "data.num_workers=0"], capsys)


@pytest.mark.parametrize("recipe", LONG_SIZED, ids=[p.stem for p in LONG_SIZED])
def test_long_stage_dry_run(recipe, data_dir, tmp_path, capsys):
    long, long_raw = load(recipe)
    short, short_raw = load(RECIPES / recipe.name)
    assert long_raw["model"] == short_raw["model"], "the long stage trains the 4K recipe's model"
    assert long.train.init_from == f"{short.ckpt_dir()}/last.ckpt" and long.out_dir() != short.out_dir()
    assert (long.data.chunk_len, long.data.n_chunks) == (4096, 16) and long.train.tbptt_chunks in (1, 2)
    assert long.optim.lr < short.optim.lr and long.optim.warmup_steps < short.optim.warmup_steps
    dry_run(recipe, [*long_dims(long), "train.init_from=null", f"data.path={data_dir}", f"logging.out_dir={tmp_path}"],
            capsys)


def long_dims(recipe) -> list[str]:
    """TINY_DIMS with the recipe's own 16-chunk windows and truncation, of 32-token chunks, one row."""
    keep = [o for o in tiny_dims(recipe) if not o.startswith(("data.n_chunks", "data.chunk_len", "data.batch_size",
                                                               "model.max_seq_len"))]
    return [*keep, "model.max_seq_len=32", "data.chunk_len=32", "data.batch_size=1"]


@pytest.mark.parametrize("recipe", LONG_TINY, ids=[p.stem for p in LONG_TINY])
def test_long_tiny_stage_dry_run(recipe, data_dir, tmp_path, capsys):
    long, long_raw = load(recipe)
    short, short_raw = load(RECIPES / recipe.name)
    assert long_raw["model"] == short_raw["model"] and long.train.init_from == f"{short.ckpt_dir()}/last.ckpt"
    assert (long.data.chunk_len, long.data.n_chunks, long.train.tbptt_chunks) == (256, 16, 1)
    dry_run(recipe, [*long_dims(long), "train.init_from=null", f"data.path={data_dir}", f"logging.out_dir={tmp_path}"], capsys)


def test_long_stage_continues_from_the_4k_checkpoint(data_dir, tmp_path, capsys):
    """tiny_lmm for 2 steps (a real run with a checkpoint), then its long stage for 3 steps from that checkpoint
    (both at TINY_DIMS; the long stage keeps its 16-chunk windows, truncated every chunk): the weights are the
    checkpoint's, the optimiser, schedule, step and data position start afresh, and the validation loss is
    logged for each of the 16 chunks of a window."""
    from titans_train.train import build as B

    dims = [o for o in TINY_DIMS if not o.startswith(("data.n_chunks", "data.val_batches"))]
    short = tmp_path / "short"
    assert main(["fit", str(RECIPES / "tiny_lmm.yaml"), *dims, f"data.path={data_dir}", f"logging.out_dir={short}",
                 "trainer.max_steps=2", "data.val_batches=1", "logging.wandb=off"]) == 0
    ckpt = short / "checkpoints" / "last.ckpt"
    long = tmp_path / "long"
    over = [*dims, f"train.init_from={ckpt}", f"data.path={data_dir}", f"logging.out_dir={long}",
            "trainer.max_steps=3", "data.val_batches=1", "trainer.val_every_steps=3", "checkpoint.every_steps=3",
            "logging.wandb=off"]
    assert main(["fit", str(RECIPES / "long" / "tiny_lmm.yaml"), *over]) == 0
    assert f"initialised the model from {ckpt}" in capsys.readouterr().out

    recipe, resolved = load(RECIPES / "long" / "tiny_lmm.yaml", over)
    model = B.build_model(recipe)
    B.init_from_checkpoint(recipe, resolved, model)
    saved = B.model_weights(ckpt)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    after = torch.load(long / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 3
    assert after["TitansDataModule"]["ranks"][0]["consumed"] == 3
    adam_steps = {float(s["step"]) for s in after["optimizer_states"][0]["state"].values()}
    assert adam_steps == {3.0}, "a fresh optimiser: 3 steps, not 2 + 3"
    rows = (long / "csv").glob("version_*/metrics.csv")
    header = next(iter(rows)).read_text().splitlines()[0]
    assert "val/loss_chunk/15" in header and "val/loss_chunk/16" not in header


def test_init_from_errors(data_dir, tmp_path, capsys):
    over = [f"data.path={data_dir}", f"logging.out_dir={tmp_path}"]
    assert main(["fit", str(RECIPES / "long" / "tiny_mag.yaml"), *over, f"train.init_from={tmp_path}/nope.ckpt",
                 "--dry-run"]) == 2
    assert "train.init_from" in capsys.readouterr().err
    assert main(["fit", str(RECIPES / "long" / "tiny_mag.yaml"), *over, "train.init_from=''", "--dry-run"]) == 2
    assert "train.init_from" in capsys.readouterr().err
