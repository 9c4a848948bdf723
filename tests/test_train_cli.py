"""`titans-train fit | validate | export | generate` end to end on CPU, as a user runs them (subprocesses).

Dimensions are overridden to a toy size (TINY) so that each run takes seconds; the default recipe's real run
(recipes/tiny.yaml, minutes) is not part of the test suite.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from titans_train.train.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# The console script's entry point (`python -m titans_train.cli` would run cli.py as __main__, a second copy of
# the module whose UserError is not the one the commands raise).
CLI = [sys.executable, "-c", "import sys; from titans_train.cli import main; sys.exit(main())"]
# One intra-op thread: toy sizes gain nothing from two, and on a busy machine OpenMP's spinning makes them crawl.
CHILD_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
TINY = [
    "model.dim=32", "model.n_layers=1", "model.heads=2", "model.window=16", "model.segment_len=16",
    "model.mac_memory_tokens=8", "model.n_persistent=2", "model.max_seq_len=32", "model.memory.chunk_size=8",
    "data.chunk_len=32", "data.n_chunks=2", "data.batch_size=4", "data.num_workers=1", "data.val_batches=2",
    "train.tbptt_chunks=1", "optim.warmup_steps=2", "optim.lr=3e-3",
    "trainer.val_every_steps=4", "trainer.log_every_steps=1", "trainer.deterministic=true",
]


def cli(*args, timeout=300, check=True, **kw):
    env = {**os.environ, **CHILD_ENV}
    env.pop("WANDB_API_KEY", None)
    r = subprocess.run([*CLI, *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "builtin"
    cli("prepare", "builtin", "--out", out)
    return out


def fit_args(data_dir, out_dir, *extra):
    return ["fit", "recipes/tiny.yaml", f"data.path={data_dir}", f"logging.out_dir={out_dir}", *TINY, *extra]


def metrics(out_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(Path(out_dir).glob("csv/version_*/metrics.csv")):
        rows += list(csv.DictReader(open(f)))
    return rows


def series(rows, key):
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = cli(*fit_args(data_dir, out, "trainer.max_steps=12", "checkpoint.every_steps=4", "checkpoint.keep_last_k=2"))
    return out, r


def test_fit_trains_checkpoints_and_logs(trained):
    out, r = trained
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000000008.ckpt", "step-000000012.ckpt"]
    assert (out / "checkpoints" / "step-000000012.yaml").is_file()
    assert os.readlink(out / "checkpoints" / "last.ckpt") == "step-000000012.ckpt"
    rows = metrics(out)
    val = series(rows, "val/loss")
    assert sorted(val) == [0, 4, 8, 12] and val[12] < val[0] - 0.5, val
    for key in ("train/loss", "train/loss_chunk/01", "throughput/tokens_per_s", "train/grad_norm", "train/lr"):
        assert series(rows, key), key
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run on disk"
    ck = load_checkpoint(out / "checkpoints" / "step-000000012.ckpt")
    assert ck["titans"]["wandb_run_id"] and runs[0].name.endswith(ck["titans"]["wandb_run_id"])
    assert "done: step 12" in r.stdout


def test_generate_validate_export(trained, data_dir, tmp_path):
    out, _ = trained
    ckpt = out / "checkpoints" / "step-000000012.ckpt"
    r = cli("generate", out / "checkpoints" / "last.ckpt", "--prompt", "def ", "--max-new-tokens", "20")
    assert r.stdout.startswith("def ") and len(r.stdout) > 5
    r = cli("validate", "recipes/tiny.yaml", f"data.path={data_dir}", *TINY, "--ckpt", ckpt)
    assert "val/loss" in r.stdout
    cli("export", ckpt, tmp_path / "export")
    assert {p.name for p in (tmp_path / "export").iterdir()} >= {"model.safetensors", "recipe.yaml", "tokenizer.json"}
    r = cli("generate", tmp_path / "export", "--prompt", "import ", "--max-new-tokens", "10", "--temperature", "0")
    assert r.stdout.startswith("import ")


def test_resume_after_sigkill_is_exact(data_dir, tmp_path):
    """2N steps straight vs. SIGKILL after the step-N checkpoint, then `fit` again (resume: auto)."""
    N = 4
    common = [f"trainer.max_steps={2 * N}", f"checkpoint.every_steps={N}", "checkpoint.keep_last_k=0",
              "logging.wandb=off", "trainer.val_every_steps=100", "train.val_at_start=false"]
    cli(*fit_args(data_dir, tmp_path / "a", *common))

    b = tmp_path / "b"
    env = {**os.environ, **CHILD_ENV}
    proc = subprocess.Popen([*CLI, *map(str, fit_args(data_dir, b, *common))], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (b / "checkpoints" / f"step-{N:09d}.ckpt").exists():
            assert proc.poll() is None and time.time() < deadline, "run b ended or stalled before step N"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    for late in list_checkpoints(b / "checkpoints"):  # on a busy machine the kill can land a few steps late:
        if int(late.stem.split("-")[1]) > N:  # drop what came after step N, as if it had died right there
            late.unlink()
    r = cli(*fit_args(data_dir, b, *common))
    assert "resuming from" in r.stdout

    final_a = load_checkpoint(tmp_path / "a" / "checkpoints" / f"step-{2 * N:09d}.ckpt")
    final_b = load_checkpoint(b / "checkpoints" / f"step-{2 * N:09d}.ckpt")
    for name, p in final_a["state_dict"].items():
        assert torch.equal(p, final_b["state_dict"][name]), name
    assert final_a["TitansDataModule"] == final_b["TitansDataModule"]  # the data cursor
    loss_a, loss_b = series(metrics(tmp_path / "a"), "train/loss"), series(metrics(b), "train/loss")
    assert all(loss_a[s] == loss_b[s] for s in range(1, 2 * N + 1)), (loss_a, loss_b)


# --- bad input: one line, exit 2, nothing lost ---------------------------------------------------------------


def _error(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("titans-train")]
    assert lines and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[-1]


@pytest.mark.parametrize("override,expect", [
    ("optim.lrr=1e-3", "did you mean optim.lr?"),
    ("trainr.max_steps=3", "did you mean trainer?"),
    ("trainer.max_steps=ten", "trainer.max_steps='ten' must be of type int"),
    ("data.path=/nonexistent/shards", "run `titans-train prepare builtin --out /nonexistent/shards`"),
    ("model.vocab_size=200", "model.vocab_size=200 is smaller than the vocabulary of the tokenizer"),
    ("trainer.matmul_precision=tf32", "trainer.matmul_precision: must be highest, high or medium; got 'tf32'"),
], ids=["unknown-key", "unknown-section", "wrong-type", "missing-data", "vocab-too-small", "matmul-precision"])
def test_bad_recipe_input(override, expect, tmp_path, data_dir):
    r = cli("fit", "recipes/tiny.yaml", f"data.path={data_dir}", f"logging.out_dir={tmp_path}", override, check=False)
    assert expect in _error(r)


def test_checkpoint_from_another_model_config(trained, data_dir):
    out, _ = trained
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    r = cli(*fit_args(data_dir, out, "model.dim=48", "trainer.max_steps=16"), check=False)
    assert "another model config: model.dim: checkpoint 32, recipe 48" in _error(r)
    r = cli("validate", "recipes/tiny.yaml", f"data.path={data_dir}", *TINY, "model.n_layers=2",
            "--ckpt", out / "checkpoints" / "step-000000012.ckpt", check=False)
    assert "model.n_layers: checkpoint 1, recipe 2" in _error(r)
    assert before == {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}


def test_non_finite_loss_stops_and_keeps_checkpoints(data_dir, tmp_path):
    # lr 1e30: step 1 is finite and saved; then the weights overflow and every loss is NaN.
    r = cli(*fit_args(data_dir, tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "trainer.max_steps=50",
                      "train.max_skipped_in_a_row=3", "checkpoint.every_steps=1", "logging.wandb=off",
                      "train.val_at_start=false"), check=False)
    assert "3 optimiser steps in a row had a non-finite loss" in _error(r)
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert ckpts and all(load_checkpoint(p)["titans"] for p in ckpts)


def test_resume_continues_the_same_wandb_run(trained, data_dir):
    """Runs last: it extends the shared run to step 14 (and rotates its step-8 checkpoint away)."""
    out, _ = trained
    run_id = load_checkpoint(out / "checkpoints" / "step-000000012.ckpt")["titans"]["wandb_run_id"]
    r = cli(*fit_args(data_dir, out, "trainer.max_steps=14", "checkpoint.every_steps=4", "checkpoint.keep_last_k=2"))
    assert "resuming from" in r.stdout and "done: step 14" in r.stdout
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs), runs
    assert load_checkpoint(out / "checkpoints" / "step-000000014.ckpt")["titans"]["wandb_run_id"] == run_id
    assert sorted(series(metrics(out), "train/loss")) == list(range(1, 15))  # the CSV continues in a new version


def test_cpu_runtime_defaults_keep_the_users_values():
    from titans_train.cli import cpu_runtime_defaults

    env = {"OMP_WAIT_POLICY": "ACTIVE", "MALLOC_MMAP_MAX_": "65536"}
    assert cpu_runtime_defaults(env, training=True) == {"THP_MEM_ALLOC_ENABLE": "1"}
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["MALLOC_MMAP_MAX_"] == "65536"
    assert cpu_runtime_defaults({}) == {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1",
                                        "MALLOC_MMAP_THRESHOLD_": "131072"}  # streaming: blocks mapped and returned


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_runtime_defaults_serve_large_blocks_from_the_heap():
    """After the CLI's training defaults a 16 MB block comes from glibc's heap (reused by the next step); with the
    streaming defaults it is mapped fresh even after one of its size was freed (glibc's default would then serve it
    from the heap), and a user's own MALLOC_ setting is left alone."""
    code = (
        "import ctypes, os\n"
        "from titans_train.cli import cpu_runtime_defaults\n"
        "cpu_runtime_defaults(training=os.environ['TRAINING'] == '1')\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free(ctypes.c_void_p(libc.malloc(16 << 20)))\n"  # glibc's default now raises its threshold to 16 MB
        "p = libc.malloc(16 << 20)\n"
        "heap = [l.split()[0].split('-') for l in open('/proc/self/maps') if l.rstrip().endswith('[heap]')]\n"
        "print(any(int(a, 16) <= p < int(b, 16) for a, b in heap))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def from_heap(e: dict) -> list[str]:
        return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True).stdout.split()

    assert from_heap({**env, "TRAINING": "1"}) == ["True"]
    assert from_heap({**env, "TRAINING": "0"}) == ["False"]  # streaming: mapped, returned when freed
    assert from_heap({**env, "TRAINING": "0", "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}) == ["True"]  # the user's


def test_flush_denormals_zeroes_subnormals_on_every_thread():
    """After flush_denormals a 2-thread elementwise op on subnormal float32 input gives zeros (the CPU's FTZ/DAZ
    mode reached the worker threads); without it the same op keeps them. A carried memory state decays through
    this range, where x86 arithmetic slows 5x and more (cli.flush_denormals)."""
    from titans_train.cli import COMPUTE_COMMANDS, SUBCOMMANDS

    assert COMPUTE_COMMANDS <= SUBCOMMANDS.keys()
    code = (
        "import sys, torch\n"
        "from titans_train.cli import flush_denormals\n"
        "torch.set_num_threads(2)\n"
        "(torch.ones(1 << 22) * 2).sum()\n"  # the thread pool exists before the mode is set
        "on = flush_denormals() if sys.argv[1] == '1' else True\n"
        "x = torch.full((1 << 22,), 1e-39)\n"
        "print(on, int((x * 1.0 != 0).sum()))\n"
    )

    def run(flag: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, check=True).stdout.split()

    on, flushed = run("1")
    if on == "False":
        pytest.skip("this CPU has no flush-to-zero mode")
    assert flushed == "0"
    assert run("0") == ["True", str(1 << 22)]
