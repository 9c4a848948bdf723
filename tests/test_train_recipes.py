"""Every `<variant>_<scale>.yaml` recipe resolves at full size, and `fit --dry-run` runs one optimiser step of it
with a tiny override of its dimensions (TINY_DIMS: width 64, one block, 64-token chunks; everything else - the
variant, memory settings, heads, gate, persistent tokens, vocabulary - as the recipe says), on the built-in
corpus. So no recipe is broken by construction."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from titans_train.cli import main
from titans_train.config import load

from tests.train_toy import one_thread as _one_thread_body


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from _one_thread_body()

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if re.fullmatch(r"(lmm|mac|mag|mal|transformer)_\d+m\.yaml", p.name))
TINY_DIMS = ["model.dim=64", "model.n_layers=1", "model.mlp_hidden=128", "model.max_seq_len=64", "model.n_persistent=4",
             "model.memory.chunk_size=8", "data.chunk_len=64", "data.n_chunks=2", "data.batch_size=2",
             "data.num_workers=0", "data.val_batches=1", "data.tokenizer=manifest"]


def test_all_twenty_recipes_found():
    assert len(RECIPES) == 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "builtin"
    assert main(["prepare", "builtin", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_dry_run(recipe, data_dir, tmp_path, capsys):
    full, _ = load(recipe)  # full size: every section validates
    over = [*TINY_DIMS, f"data.path={data_dir}", f"logging.out_dir={tmp_path}"]
    if full.model.window is not None:
        over.append("model.window=32")
    if full.model.variant == "mac":
        over += ["model.segment_len=32", "model.mac_memory_tokens=16"]
    assert main(["fit", str(recipe), *over, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run ok: 1 step" in out, out[-2000:]
    assert not (tmp_path / "checkpoints").exists()
