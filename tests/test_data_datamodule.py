"""The DataModule under a real Lightning Trainer: resume from a checkpoint gives the uninterrupted run's
batches (Lightning prefetches, the cursor is the trained-on batch's), persistent workers across loader epochs,
the tokenizer check, and the config's validation."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from titans_train.cli import main
from titans_train.data import DataConfig, TitansDataModule
from titans_train.data.shards import DataError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm") / "builtin"
    assert main(["prepare", "builtin", "--out", str(out), "--limit", "60", "--shard-size", "64KiB",
                 "--val-fraction", "0.1", "--no-progress"]) == 0
    return out


class Recorder(L.LightningModule):
    """A real (tiny) model that records the batches it trains and validates on."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(257, 4)
        self.seen, self.val_seen = [], []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["tokens"].clone())
        return self.emb(batch["tokens"][:, :-1]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        assert "cursor" not in batch
        self.val_seen.append(batch["tokens"].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def cfg(path, **kw):
    kw = {"chunk_len": 32, "n_chunks": 2, "batch_size": 2, "num_workers": 2, "shuffle_buffer": 5, "seed": 1, **kw}
    return DataConfig(path=str(path), **kw)


def trainer(tmp_path, **kw):
    kw = {"max_steps": 11, "val_check_interval": 4, "check_val_every_n_epoch": None, "limit_val_batches": 2, **kw}
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw)


def test_fit_resume_from_checkpoint_equals_uninterrupted(data_dir, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    ref = Recorder()
    trainer(tmp_path, callbacks=[ckpt]).fit(ref, datamodule=TitansDataModule(cfg(data_dir)))
    assert len(ref.seen) == 11 and ref.val_seen
    state = torch.load(tmp_path / "ckpt" / "step=5.ckpt", weights_only=True)["TitansDataModule"]
    assert state["ranks"][0]["consumed"] == 5 and state["num_workers"] == 2

    resumed = Recorder()
    trainer(tmp_path).fit(resumed, datamodule=TitansDataModule(cfg(data_dir)), ckpt_path=tmp_path / "ckpt" / "step=5.ckpt")
    assert len(resumed.seen) == 6
    for i, (a, b) in enumerate(zip(ref.seen[5:], resumed.seen)):
        assert torch.equal(a, b), f"batch {5 + i} differs after resume"


def test_loader_epochs_with_persistent_workers_continue_the_stream(data_dir, tmp_path):
    """limit_train_batches ends Lightning epochs, which restarts the persistent workers' iteration: the batches
    still follow one continuous stream (nothing lost to prefetch, nothing repeated)."""
    ref = Recorder()
    trainer(tmp_path, max_steps=12, limit_val_batches=0).fit(ref, datamodule=TitansDataModule(cfg(data_dir)))
    epochs = Recorder()
    trainer(tmp_path, max_steps=-1, max_epochs=3, limit_train_batches=4, limit_val_batches=0).fit(
        epochs, datamodule=TitansDataModule(cfg(data_dir)))
    assert len(epochs.seen) == 12
    assert all(torch.equal(a, b) for a, b in zip(ref.seen, epochs.seen))


def test_two_ranks_state_dict_and_world_size_check(data_dir):
    dms = [TitansDataModule(cfg(data_dir, num_workers=1), rank=r, world_size=2) for r in range(2)]
    for dm in dms:
        dm.setup("fit")
    firsts = [next(iter(dm.train_dataloader()))["tokens"] for dm in dms]
    assert not torch.equal(firsts[0], firsts[1]), "ranks read different shards"
    state = dms[1].state_dict()
    assert state["world_size"] == 2 and state["ranks"][0] is None and state["ranks"][1]["consumed"] == 0
    other = TitansDataModule(cfg(data_dir, num_workers=1), rank=0, world_size=1)
    other.setup("fit")
    with pytest.raises(DataError, match="2 ranks x data.num_workers=1"):
        other.load_state_dict(state)


def test_position_of_another_format_or_batch_size_is_refused(data_dir):
    """A data position saved by the one-cursor-per-stream format (version 1), or with another data.batch_size,
    cannot continue the data exactly: one-line errors that say what to do."""
    dm = TitansDataModule(cfg(data_dir, num_workers=1), rank=0, world_size=1)
    dm.setup("fit")
    state = dm.state_dict()
    assert state["version"] == 2 and torch.tensor(state["ranks"][0]["cursors"]).shape == (1, 2, 6)
    with pytest.raises(DataError, match="train.init_from"):
        dm.load_state_dict({**state, "version": 1})
    wider = TitansDataModule(cfg(data_dir, num_workers=1, batch_size=3), rank=0, world_size=1)
    wider.setup("fit")
    with pytest.raises(DataError, match="data.batch_size=3"):
        wider.load_state_dict(state)


def test_tokenizer_of_recipe_must_match_manifest(data_dir, tmp_path):
    assert main(["prepare", "builtin", "--out", str(tmp_path / "bpe"), "--limit", "20", "--train-tokenizer", "300",
                 "--no-progress"]) == 0
    dm = TitansDataModule(cfg(data_dir, tokenizer=str(tmp_path / "bpe" / "tokenizer.json")))
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "\n" not in msg and str(data_dir / "manifest.json") in msg and "data.tokenizer" in msg
    TitansDataModule(cfg(tmp_path / "bpe", tokenizer="manifest", num_workers=0)).setup("fit")  # accepted


def test_validation_is_one_pass_with_equal_batches(data_dir):
    dm = TitansDataModule(cfg(data_dir, num_workers=2), rank=0, world_size=1)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert len(batches) == dm.val_stream.num_batches() > 0
    assert all(b["tokens"].shape == (2, 65) for b in batches)


@pytest.mark.parametrize(
    "kw, key",
    [({"chunk_len": 0}, "data.chunk_len"), ({"batch_size": -1}, "data.batch_size"),
     ({"num_workers": -1}, "data.num_workers"), ({"val_batches": 0}, "data.val_batches"), ({"path": ""}, "data.path")],
    ids=["chunk_len", "batch_size", "num_workers", "val_batches", "path"],
)
def test_config_errors_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        DataConfig(**kw)


def test_config_window_len():
    c = DataConfig(chunk_len=4096, n_chunks=16, batch_size=2)
    assert c.window_len() == 65537 and c.tokens_per_batch() == 2 * 65536
