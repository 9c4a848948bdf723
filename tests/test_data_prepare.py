"""`titans-train prepare`: the built-in corpus, determinism, round trips, input formats, bad input, interruption."""

import gzip
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from titans_train.cli import main
from titans_train.data.shards import DataError, Manifest, iter_shard
from titans_train.data.tokenizer import ByteTokenizer, HFTokenizer

REPO = Path(__file__).resolve().parents[1]


def prepare(*argv) -> int:
    return main(["prepare", *map(str, argv), "--no-progress"])


def docs_of(out, split="train"):
    m = Manifest(out)
    return [d for s in m.shards(split) for d in iter_shard(s)]


def shard_bytes(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.tar"))}


def stdlib_texts() -> list:
    """The built-in corpus read independently of titans_train: [text or None (not UTF-8)] of the stdlib's .py
    files in sorted order of their relative paths."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.relative_to(root).parts[0] not in ("site-packages", "dist-packages") and "__pycache__" not in p.parts
    )
    out = []
    for rel in rels:
        try:
            out.append((root / rel).read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
    return out


def test_builtin_corpus_twice_byte_identical_with_counts(tmp_path, capsys):
    """The whole built-in corpus (no network): counts printed and in the manifest; twice -> identical shards."""
    assert prepare("builtin", "--out", tmp_path / "a") == 0
    printed = capsys.readouterr().out
    assert prepare("builtin", "--out", tmp_path / "b") == 0
    m = Manifest(tmp_path / "a").data
    for split in ("train", "validation"):
        s = m["splits"][split]
        assert s["docs"] == sum(x["docs"] for x in s["shards"]) > 0
        assert s["tokens"] == sum(x["tokens"] for x in s["shards"]) > 0
        assert f"{split}: {s['docs']:,} documents, {s['tokens']:,} tokens" in printed
    assert m["splits"]["train"]["tokens"] > 10_000_000, "the stdlib is tens of MB of text"
    assert m["tokenizer"]["kind"] == "byte" and m["dtype"] == "uint16"
    assert m["command"].startswith("titans-train prepare builtin --out")
    a, b = shard_bytes(tmp_path / "a"), shard_bytes(tmp_path / "b")
    assert len(a) >= 16 and a == b
    # the documentation topics come last, in key order, in whichever split their id hashes to
    from pydoc_data.topics import topics

    tok = ByteTokenizer()
    tail = [tok.decode(d) for split in ("train", "validation") for d in docs_of(tmp_path / "a", split)[-len(topics):]]
    assert set(topics.values()) <= set(tail)


def test_builtin_round_trip_byte_tokenizer(tmp_path):
    """Detokenised documents from the shards equal the stdlib files' text, in order, split by the manifest."""
    assert prepare("builtin", "--out", tmp_path, "--limit", "150", "--val-fraction", "0.1") == 0
    texts = [t for t in stdlib_texts()[:150] if t]  # --limit N: the first N files; empty/non-UTF-8 skipped
    tok = ByteTokenizer()
    got = [tok.decode(d) for split in ("train", "validation") for d in docs_of(tmp_path, split)]
    assert sorted(got) == sorted(texts)
    train = [tok.decode(d) for d in docs_of(tmp_path, "train")]
    assert train == [t for t in texts if t in set(train)], "train documents keep the input order"
    assert 0 < len(docs_of(tmp_path, "validation")) < 40


def test_trained_bpe_round_trip_and_fingerprint(tmp_path, capsys):
    out = tmp_path / "bpe"
    assert prepare("builtin", "--out", out, "--limit", "60", "--train-tokenizer", "1000", "--val-fraction", "0.1") == 0
    m = Manifest(out)
    assert m.tokenizer["kind"] == "hf" and m.tokenizer["path"] == "tokenizer.json"
    tok = m.load_tokenizer("manifest")
    assert tok.vocab_size == 1000 and m.tokenizer["fingerprint"] == HFTokenizer(out / "tokenizer.json").fingerprint()
    texts = [t for t in stdlib_texts()[:60] if t]
    got = [tok.decode(d) for split in ("train", "validation") for d in docs_of(out, split)]
    assert sorted(got) == sorted(texts), "byte-level BPE is lossless"
    n_bytes = sum(len(t.encode()) for t in texts)
    assert m.data["splits"]["train"]["tokens"] + m.data["splits"]["validation"]["tokens"] < 0.6 * n_bytes
    # trained twice: the same tokenizer and the same shards
    assert prepare("builtin", "--out", tmp_path / "bpe2", "--limit", "60", "--train-tokenizer", "1000",
                   "--val-fraction", "0.1") == 0
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "bpe2" / "tokenizer.json").read_bytes()
    assert shard_bytes(out) == shard_bytes(tmp_path / "bpe2")


def test_rerun_is_idempotent_and_different_command_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "d"
    assert prepare("builtin", "--out", out, "--limit", "40") == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert prepare("builtin", "--out", out, "--limit", "40") == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before, "nothing rewritten"
    assert prepare("builtin", "--out", out, "--limit", "50") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and str(out) in err
    assert prepare("builtin", "--out", out, "--limit", "50", "--overwrite") == 0
    assert Manifest(out).data["request"]["limit"] == 50


def write_jsonl(path, texts, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"body": t, "id": 1}) + "\n")


TEXTS = [f"document {i}: " + "héllo wörld 漢字 🙂 " * (i % 7 + 1) + "\r\nend" for i in range(40)]


def test_local_formats_round_trip(tmp_path):
    """.txt, .jsonl, .jsonl.gz and .parquet (two row groups) through a glob, text field configurable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(TEXTS[0], encoding="utf-8", newline="")
    write_jsonl(src / "b.jsonl", TEXTS[1:15])
    write_jsonl(src / "c.jsonl.gz", TEXTS[15:25], opener=gzip.open)
    pq.write_table(pa.table({"body": TEXTS[25:40]}), src / "d.parquet", row_group_size=8)
    out = tmp_path / "out"
    assert prepare(str(src / "*"), "--out", out, "--text-field", "body", "--val-fraction", "0") == 0
    tok = ByteTokenizer()
    assert [tok.decode(d) for d in docs_of(out)] == TEXTS
    assert Manifest(out).data["splits"]["train"]["docs"] == 40


def test_hf_dataset_from_local_path(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    ds.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    assert prepare(f"hf:{tmp_path / 'saved'}", "--out", out, "--val-fraction", "0", "--workers", "2") == 0
    assert [ByteTokenizer().decode(d) for d in docs_of(out)] == TEXTS
    jsonl_dir = tmp_path / "jsonl"
    jsonl_dir.mkdir()
    write_jsonl(jsonl_dir / "part.jsonl", TEXTS)  # a directory of data files: datasets.load_dataset(path)
    out2 = tmp_path / "out2"
    assert prepare(f"hf:{jsonl_dir}", "--out", out2, "--val-fraction", "0", "--text-field", "body", "--limit", "7") == 0
    assert [ByteTokenizer().decode(d) for d in docs_of(out2)] == TEXTS[:7]


def big_vocab_tokenizer(path, n=70_000):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(n - 2)} | {"[UNK]": n - 2, "</s>": n - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_large_vocab_uses_uint32_and_uint16_is_refused(tmp_path, capsys):
    tok = big_vocab_tokenizer(tmp_path / "big.json")
    (tmp_path / "x.txt").write_text("w1 w69000 w5 w68000")
    assert prepare(tmp_path / "x.txt", "--out", tmp_path / "o", "--tokenizer", tok, "--val-fraction", "0") == 0
    m = Manifest(tmp_path / "o")
    assert m.dtype == np.uint32 and m.tokenizer["eos_token"] == "</s>"
    assert docs_of(tmp_path / "o")[0].tolist() == [1, 69000, 5, 68000]
    capsys.readouterr()
    assert prepare(tmp_path / "x.txt", "--out", tmp_path / "p", "--tokenizer", tok, "--dtype", "uint16") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "uint16" in err and "--dtype uint32" in err
    assert not (tmp_path / "p" / "manifest.json").exists()
    # a manifest that claims uint16 for that vocabulary is refused by the loader, naming the file
    mf = tmp_path / "o" / "manifest.json"
    data = json.loads(mf.read_text())
    data["dtype"] = "uint16"
    mf.write_text(json.dumps(data))
    with pytest.raises(DataError, match="manifest.json: dtype uint16 cannot hold"):
        Manifest(tmp_path / "o")


def test_empty_glob_and_missing_input_are_one_line_errors(tmp_path, capsys):
    assert prepare(str(tmp_path / "nothing" / "*.jsonl"), "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "matches no files" in err and "nothing/*.jsonl" in err
    assert prepare(tmp_path / "absent.txt", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.txt does not exist" in err
    assert not (tmp_path / "o").exists(), "nothing written on bad input"


def test_bad_line_midway_leaves_no_complete_looking_dataset(tmp_path, capsys):
    """An error half-way (bad JSON in a later file): completed shards may stay, but no manifest and no temp file;
    the loader refuses the directory; fixing the input and re-running gives the same as a clean run."""
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", TEXTS * 5)
    (src / "b.jsonl").write_text('{"body": "ok"}\n{"body": broken\n')
    out = tmp_path / "out"
    args = (str(src / "*.jsonl"), "--out", out, "--text-field", "body", "--shard-size", "8KiB", "--workers", "1")
    assert prepare(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "b.jsonl:2 is not valid JSON" in err
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp")), "no partial shard left behind"
    assert list(out.glob("train-*.tar")), "the shards finished before the error are complete files"
    with pytest.raises(DataError, match="prepare the data first"):
        Manifest(out)
    (src / "b.jsonl").write_text('{"body": "ok"}\n')
    assert prepare(*args) == 0
    args_clean = list(args)
    args_clean[2] = tmp_path / "clean"
    assert prepare(*args_clean) == 0
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")


def test_killed_prepare_leaves_no_complete_looking_shard(tmp_path):
    """SIGKILL while shards are being written: only complete .tar files (renamed when done) and at most one
    .tar.tmp, no manifest; the next run cleans up and gives the same shards as an uninterrupted run."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "titans_train.cli", "prepare", "builtin", "--out", str(out), "--limit", "600",
           "--shard-size", "64KiB", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("train-0000[3-9].tar")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed before the manifest (the test needs a slower kill point)"
    for p in out.glob("*.tar"):  # every .tar is a complete archive
        docs = list(iter_shard_unchecked(p))
        assert docs and all(d.ndim == 1 for d in docs)
    assert len(list(out.glob("*.tmp"))) <= 1
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    cmd_clean = cmd.copy()
    cmd_clean[cmd.index("--out") + 1] = str(tmp_path / "clean")
    assert subprocess.run(cmd_clean, cwd=REPO, capture_output=True).returncode == 0
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert not list(out.glob("*.tmp"))


def iter_shard_unchecked(path):
    """Read a tar the strict way (tarfile raises on a truncated archive)."""
    import io
    import tarfile

    with tarfile.open(path, "r:") as tf:
        for member in tf.getmembers():
            yield np.load(io.BytesIO(tf.extractfile(member).read()), allow_pickle=False)


def test_cli_help_is_fast_and_lists_prepare():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "titans_train.cli", "prepare", "--help"], capture_output=True, text=True,
                       env=env, cwd=REPO)
    assert r.returncode == 0 and "--train-tokenizer" in r.stdout and "--shard-size" in r.stdout
