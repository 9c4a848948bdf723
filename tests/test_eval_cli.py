"""`titans-train eval` end to end on a checkpoint that `fit` wrote with the `eval:` section on (eval during fit),
on its export, and the bad-input errors (one line, exit 2). prepare and fit run as subprocesses, as a user runs
them; eval and export run through the CLI's `main` in this process (one import of Lightning, not one per call)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_train_cli import cli, metrics
from titans_train.cli import main

TINY = ["model.dim=32", "model.n_layers=1", "model.heads=2", "model.max_seq_len=128", "model.window=16",
        "model.memory.chunk_size=8", "data.chunk_len=128", "data.n_chunks=2", "data.batch_size=2",
        "data.val_batches=1", "train.tbptt_chunks=1", "trainer.val_every_steps=100", "trainer.log_every_steps=1",
        "checkpoint.every_steps=4", "eval.every_steps=2", "eval.max_tokens=600", "eval.window=128",
        "eval.piece_len=100", "eval.niah_lengths=[300]", "eval.niah_depths=[0.0,1.0]", "eval.niah_samples=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "passkey"
    cli("prepare", "passkey:docs=400,min_len=200,max_len=700", "--out", data, "--val-fraction", "0.05",
        "--no-progress")
    out = root / "run"
    cli("fit", "recipes/tiny_niah_lmm.yaml", f"data.path={data}", f"logging.out_dir={out}", "trainer.max_steps=4",
        *TINY)
    return root, data, out, out / "checkpoints" / "last.ckpt"


def test_eval_during_fit_logs_under_eval(run):
    _, _, out, _ = run
    rows = metrics(out)
    steps = sorted(int(r["step"]) for r in rows if r.get("eval/loss_streamed"))
    assert steps == [2, 4]
    row = next(r for r in rows if r.get("eval/loss_streamed"))
    assert 0 < float(row["eval/loss_streamed"]) < 10 and 0 < float(row["eval/loss_windowed"]) < 10
    assert row.get("eval/loss_streamed/pos_0") and row.get("eval/loss_streamed/pos_512")
    assert 0 <= float(row["eval/niah_acc"]) <= 1 and row.get("eval/niah_acc/300")


def run_main(*args) -> int:
    return main([str(a) for a in args])


def test_eval_ppl_and_niah_on_a_checkpoint_and_its_export(run, capsys):
    root, data, out, ckpt = run
    assert run_main("eval", ckpt, "--task", "ppl", "--data", data, "--max-tokens", "1500", "--window", "128",
            "--piece-len", "64", "--out", root / "e1") == 0
    stdout = capsys.readouterr().out
    res = json.loads((root / "e1" / "ppl.json").read_text())
    assert res["tokens"] == 1500 and res["window"] == 128 and res["variant"] == "lmm"
    assert [b["start"] for b in res["buckets"]] == [0, 512][: len(res["buckets"])]
    assert "streamed" in stdout and (root / "e1" / "ppl.png").stat().st_size > 1000
    assert run_main("export", ckpt, root / "export") == 0
    assert run_main("eval", root / "export", "--task", "niah", "--lengths", "300,600", "--depths", "0,0.5,1", "--samples", "2",
        "--digits", "1", "--piece-len", "128", "--out", root / "e2") == 0
    res = json.loads((root / "e2" / "niah.json").read_text())
    assert set(res["accuracy"]) == {"300", "600"} and set(res["accuracy"]["300"]) == {"0.0", "0.5", "1.0"}
    assert len(res["replies"]) == 12 and res["chance"] == 0.1 and res["peak_rss_bytes"] > 0
    assert (root / "e2" / "niah.png").stat().st_size > 1000
    assert run_main("eval", ckpt, "--task", "niah", "--lengths", "300", "--depths", "0.5", "--samples", "1") == 0
    assert (ckpt.resolve().parent / (ckpt.resolve().name + ".eval") / "niah.json").is_file()


def one_line_error(capsys, args, *words):
    capsys.readouterr()
    assert run_main("eval", *args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("titans-train eval: error:"), err
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_input_is_one_line_exit_2(run, tmp_path, capsys):
    root, data, out, ckpt = run
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    one_line_error(capsys, [junk, "--task", "ppl"], "not a readable")
    one_line_error(capsys, [tmp_path, "--task", "ppl"], "neither")
    import torch

    torch.save({"state_dict": {}, "epoch": 3}, tmp_path / "other.ckpt")  # a Lightning checkpoint of another project
    one_line_error(capsys, [tmp_path / "other.ckpt", "--task", "niah"], "not a titans-train checkpoint")
    saved = torch.load(Path(ckpt).resolve(), map_location="cpu", weights_only=False)  # as an older version wrote it
    key = next(k for k in saved["state_dict"] if k.endswith("mlp_norm.weight"))
    del saved["state_dict"][key]
    torch.save(saved, tmp_path / "older.ckpt")
    one_line_error(capsys, [tmp_path / "older.ckpt", "--task", "niah"], "do not fit", "missing", key.removeprefix("model."))
    (tmp_path / "doc.txt").write_text("hello world, a text for another tokenizer. " * 200)
    other = tmp_path / "bpe"
    assert run_main("prepare", tmp_path / "doc.txt", "--out", other, "--train-tokenizer", "300", "--val-fraction",
                    "0", "--workers", "1", "--no-progress") == 0
    one_line_error(capsys, [ckpt, "--task", "ppl", "--data", other, "--split", "train"], "tokenizer")
    one_line_error(capsys, [ckpt, "--task", "niah", "--lengths", "40"], "needle", "longer")
    one_line_error(capsys, [ckpt, "--task", "niah", "--lengths", "120"], "below the prompt")
    one_line_error(capsys, [ckpt, "--task", "ppl", "--data", data, "--split", "nope"], "split")
