"""The Lightning side of training on a toy model: steps, metrics, checkpoints, exact resume, NaN handling."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from tests.train_toy import ToyData, ToyLM
from titans_train.train import fit as fit_cmd
from titans_train.train.checkpoint import list_checkpoints, load_checkpoint, newest_valid
from titans_train.config import recipe_config
from titans_train.train.module import TitansLitModule, TrainingDiverged

from tests.train_toy import one_thread as _one_thread_body


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from _one_thread_body()


def _recipe(tmp_path, **over):
    raw = {
        "model": {"variant": "lmm", "vocab_size": 17, "dim": 8, "n_layers": 1, "heads": 2, "max_seq_len": 8,
                  "window": 8, "n_persistent": 0},
        "data": {"path": str(tmp_path / "data"), "chunk_len": 8, "n_chunks": 3, "batch_size": 4, "num_workers": 0},
        "train": {"tbptt_chunks": 2, "seed": 0},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "decay_steps": 8},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 8, "val_every_steps": 4, "log_every_steps": 1},
        "logging": {"out_dir": str(tmp_path / "run"), "wandb": "off"},
        "checkpoint": {"every_steps": 2, "keep_last_k": 2},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    raw["data"]["val_batches"] = 2
    return recipe_config(raw), raw


def _fit(tmp_path, model=None, ckpt=None, **over):
    recipe, raw = _recipe(tmp_path, **over)
    torch.manual_seed(0)
    model = model or ToyLM()
    lit = TitansLitModule(model, raw, recipe.train, recipe.optim, recipe.data.chunk_len)
    losses = []

    class Record(__import__("lightning").Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            if pl_module.step_stats is not None:
                losses.append(pl_module.step_stats.loss)

    trainer = fit_cmd.build_trainer(recipe, "x: 1\n", raw, lit, run_id=None, dry_run=False, fresh=ckpt is None)
    trainer.callbacks.append(Record())
    dm = ToyData(seed=0)
    trainer.fit(lit, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    return lit, losses, recipe


def test_fit_writes_rotated_checkpoints_and_metrics(tmp_path):
    lit, losses, recipe = _fit(tmp_path)
    assert len(losses) == 8 and losses[-1] < losses[0]
    ckpts = list_checkpoints(recipe.ckpt_dir())
    assert [p.name for p in ckpts] == ["step-000000006.ckpt", "step-000000008.ckpt"]  # keep_last_k=2
    assert all(p.with_suffix(".yaml").is_file() for p in ckpts)
    assert not [p for p in Path(recipe.ckpt_dir()).iterdir() if p.name.endswith(".tmp")]
    ck = load_checkpoint(ckpts[-1])  # weights_only=True
    assert ck["titans"]["recipe"]["model"]["dim"] == 8 and ck["titans"]["tokens_seen"] == 8 * 4 * 24
    rows = list(csv.DictReader(open(next(Path(recipe.out_dir()).glob("csv/version_*/metrics.csv")))))
    keys = {k for r in rows for k, v in r.items() if v}
    for k in ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/skipped_steps", "train/tokens_seen",
              "train/loss_chunk/00", "train/loss_chunk/02", "val/loss", "val/ppl", "val/loss_chunk/01",
              "throughput/tokens_per_s", "memory/peak_rss_gib"):
        assert k in keys, k
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert rows[0].get("val/loss") and len(val) == 3  # at step 0, 4, 8
    assert val[-1] < val[0]


def test_resume_is_exact(tmp_path):
    """8 steps straight == 4 steps, then a fresh process-like restart from the step-4 checkpoint, then 4 more."""
    straight, losses_a, _ = _fit(tmp_path / "a")
    _, first, rec = _fit(tmp_path / "b", trainer__max_steps=4)
    resumed, second, _ = _fit(tmp_path / "b", ckpt=str(Path(rec.ckpt_dir()) / "step-000000004.ckpt"))
    assert first + second == losses_a
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


class NaNLM(ToyLM):
    def forward(self, tokens, state=None, reset=None):
        logits, state = super().forward(tokens, state, reset)
        return logits * float("nan"), state


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    recipe, raw = _recipe(tmp_path)
    _fit(tmp_path, trainer__max_steps=2)  # leaves a good checkpoint at step 2
    before = {p.name: p.read_bytes() for p in Path(recipe.ckpt_dir()).iterdir()}
    with pytest.raises(TrainingDiverged, match="3 optimiser steps in a row"):
        _fit(tmp_path, model=NaNLM(), ckpt=None, train__max_skipped_in_a_row=3, checkpoint__every_steps=1)
    after = {p.name: p.read_bytes() for p in Path(recipe.ckpt_dir()).iterdir()}
    assert before == after
    assert newest_valid(recipe.ckpt_dir()).name == "step-000000002.ckpt"


def test_newest_valid_skips_a_corrupt_checkpoint(tmp_path):
    _, _, recipe = _fit(tmp_path, trainer__max_steps=4, checkpoint__keep_last_k=0)
    newest = list_checkpoints(recipe.ckpt_dir())[-1]
    newest.write_bytes(newest.read_bytes()[: 1000])  # a torn file (as a crash mid-copy would leave)
    with pytest.warns(UserWarning, match="skipping unreadable"):
        assert newest_valid(recipe.ckpt_dir()).name == "step-000000002.ckpt"
