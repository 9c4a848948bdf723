"""Scale-out on CPU, for real: 2 processes over gloo running `titans-train fit` as users run it.

- ddp x2 and fsdp (FSDP2) x2 give the loss trajectory of 1 process with the same global batch: 2 ranks x 1 data
  worker x B windows == 1 rank x 2 workers x B windows x 2 accumulated windows (the same two data streams, one
  gradient average), so the logged global-batch loss must agree to float tolerance.
- The FSDP2 checkpoint resumes on 2 processes and on 1 (2 ranks x 1 worker -> 1 rank x 2 workers: the same
  streams), continuing the uninterrupted run's losses.
- Two "nodes" on one machine: SLURM-style environment variables (what srun sets), and torchrun --nnodes 2.
- SIGUSR1 / SIGTERM to a running fit leave a valid checkpoint from which `fit` resumes.

Children are `titans-train` / `torchrun` subprocesses (never a pytest session), each with a timeout, killed
with their process group on failure; ports are free loopback ports. The whole file takes about a minute on
2 cores. ZeRO-2 on DeepSpeed's CPU accelerator is `slow` (its first start compiles an op for minutes); the
Lightning DeepSpeed path needs a GPU.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from titans_train.train.checkpoint import is_valid, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLI = [str(BIN / "titans-train")] if (BIN / "titans-train").exists() else [
    sys.executable, "-c", "import sys; from titans_train.cli import main; sys.exit(main())"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TINY = [
    "model.dim=32", "model.n_layers=2", "model.heads=2", "model.window=16", "model.n_persistent=2",
    "model.max_seq_len=32", "model.memory.chunk_size=8", "data.chunk_len=32", "data.n_chunks=2",
    "data.batch_size=2", "data.val_split=''", "train.tbptt_chunks=1", "optim.warmup_steps=2",
    "optim.decay_steps=8", "trainer.log_every_steps=1", "trainer.accelerator=cpu", "trainer.deterministic=true",
    "logging.wandb=off",
]
ONE = ["trainer.devices=1", "data.num_workers=2", "train.accumulate_windows=2"]  # 1 rank, same global batch
TWO = ["trainer.devices=2", "data.num_workers=1"]
RTOL = 2e-4  # gradient averages summed in another order; Adam amplifies the last bits over steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
         "PYTHONHASHSEED": "0", **extra}
    for k in list(e):
        if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                                "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
            if k not in extra:
                del e[k]
    return e


def start(cmd, **extra_env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(procs, timeout=240, expect=0) -> list[str]:
    """Wait for all; on a timeout or a bad exit code kill every process group and fail with the output."""
    outs, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append(out)
    except subprocess.TimeoutExpired:
        kill(procs)
        raise AssertionError(f"timed out after {timeout}s:\n" + "\n".join((p.stdout.read() or "")[-2000:] for p in procs))
    bad = [(p.returncode, o) for p, o in zip(procs, outs) if p.returncode != expect]
    if bad:
        kill(procs)
        raise AssertionError(f"exit codes {[p.returncode for p in procs]} (expected {expect}):\n" + bad[0][1][-4000:])
    return outs


def kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)


def fit_cmd(data, out, *extra) -> list[str]:
    return ["fit", "recipes/tiny.yaml", f"data.path={data}", f"logging.out_dir={out}", *TINY, *extra]


def fit(data, out, *extra, timeout=240) -> str:
    return finish([start([*CLI, *fit_cmd(data, out, *extra)])], timeout)[0]


def torchrun(data, out, *extra, nproc=2, timeout=240) -> str:
    cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "--no-python", *CLI, *fit_cmd(data, out, *extra)] if len(CLI) == 1 else None
    if cmd is None:
        pytest.skip("needs the titans-train console script (pip install -e .)")
    return finish([start(cmd)], timeout)[0]


def losses(out: Path) -> dict[int, float]:
    rows = [r for f in sorted(Path(out).glob("csv/version_*/metrics.csv")) for r in csv.DictReader(open(f))]
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def assert_close(a: dict, b: dict, steps, rtol=RTOL):
    assert all(s in a and s in b for s in steps), (sorted(a), sorted(b))
    for s in steps:
        assert abs(a[s] - b[s]) <= rtol * abs(b[s]), f"step {s}: {a[s]} vs {b[s]}\n{a}\n{b}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "builtin"
    finish([start([*CLI, "prepare", "builtin", "--out", str(out)])], 120)
    return out


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Four steps each: 1 process, ddp x2, fsdp x2 (checkpoints every 2 steps)."""
    root = tmp_path_factory.mktemp("runs")
    common = ["trainer.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last_k=0"]
    t0 = time.monotonic()
    fit(data, root / "one", *common, *ONE)
    torchrun(data, root / "ddp", *common, *TWO, "trainer.strategy=ddp")
    torchrun(data, root / "fsdp", *common, *TWO, "trainer.strategy=fsdp")
    print(f"three 4-step runs in {time.monotonic() - t0:.1f}s")
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(runs, strategy):
    ref, got = losses(runs / "one"), losses(runs / strategy)
    assert_close(got, ref, [1, 2, 3, 4])
    assert ref[4] < ref[1]  # it trains
    assert got[1] == ref[1]  # the first step sees identical parameters and data


def test_activation_checkpointing_under_fsdp_gives_the_same_losses(runs, data, tmp_path):
    """trainer.activation_checkpointing recomputes each block in backward (here inside FSDP2's hooks, 1 process)."""
    fit(data, tmp_path / "ac", "trainer.max_steps=2", "checkpoint.every_steps=2", *ONE, "trainer.strategy=fsdp",
        "trainer.activation_checkpointing=true")
    assert_close(losses(tmp_path / "ac"), losses(runs / "one"), [1, 2], rtol=1e-5)


def test_fsdp_checkpoint_is_one_full_file(runs):
    ckpts = list_checkpoints(runs / "fsdp" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000000002.ckpt", "step-000000004.ckpt"] and all(map(is_valid, ckpts))
    fsdp, one = load_checkpoint(ckpts[-1])["state_dict"], load_checkpoint(runs / "one/checkpoints/step-000000004.ckpt")["state_dict"]
    assert fsdp.keys() == one.keys()  # plain parameter names: export / validate / generate read it as any other
    for k in one:
        assert fsdp[k].shape == one[k].shape and (fsdp[k] - one[k]).abs().max() < 1e-3, k


def test_fsdp_checkpoint_resumes_on_two_and_on_one(runs, data, tmp_path):
    ref = losses(runs / "fsdp")
    for name, procs in [("two", TWO), ("one", ONE)]:
        out = tmp_path / name
        (out / "checkpoints").mkdir(parents=True)
        for f in ("step-000000002.ckpt", "step-000000002.yaml"):  # the run as it stood at step 2
            shutil.copy(runs / "fsdp" / "checkpoints" / f, out / "checkpoints" / f)
        run = torchrun if name == "two" else fit
        text = run(data, out, "trainer.max_steps=4", "checkpoint.every_steps=2", *procs, "trainer.strategy=fsdp")
        assert "resuming from" in text and "step-000000002.ckpt" in text
        got = losses(out)
        assert sorted(got) == [3, 4], got
        assert_close(got, ref, [3, 4], rtol=1e-5)  # continues the uninterrupted 2-process run


def test_two_nodes_slurm_environment(data, tmp_path):
    """Two processes as srun starts them on two nodes (one task each): Lightning's SLURM environment."""
    port, out = free_port(), tmp_path / "slurm"
    cmd = [*CLI, *fit_cmd(data, out, "trainer.max_steps=2", "checkpoint.every_steps=2", "trainer.num_nodes=2",
                          "trainer.devices=1", "data.num_workers=1", "trainer.strategy=ddp")]
    procs = [start(cmd, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_PROCID=str(r),
                   SLURM_LOCALID="0", SLURM_NODEID=str(r), SLURM_JOB_ID="4242", SLURM_JOB_NAME="titans",
                   SLURM_NODELIST="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for r in range(2)]
    outs = finish(procs)
    assert all("done: step 2" in o for o in outs), outs[0][-2000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000000002.ckpt"]


def test_two_nodes_torchrun(data, tmp_path):
    """Two torchrun launchers (--nnodes 2, one process each) rendezvous on loopback and fit."""
    if len(CLI) != 1:
        pytest.skip("needs the titans-train console script (pip install -e .)")
    port, out = free_port(), tmp_path / "tr"
    args = fit_cmd(data, out, "trainer.max_steps=2", "checkpoint.every_steps=2", "trainer.num_nodes=2",
                   "trainer.devices=1", "data.num_workers=1", "trainer.strategy=fsdp")
    procs = [start([*TORCHRUN, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1", "--master-addr",
                    "127.0.0.1", "--master-port", str(port), "--no-python", *CLI, *args]) for r in range(2)]
    outs = finish(procs)
    assert all("done: step 2" in o for o in outs)
    assert is_valid(out / "checkpoints" / "step-000000002.ckpt")


def _wait_for_steps(out: Path, proc, n: int, timeout=120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(losses(out)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"fit ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    kill([proc])
    raise AssertionError("fit logged no steps in time")


@pytest.mark.parametrize("sig,procs", [(signal.SIGUSR1, TWO + ["trainer.strategy=ddp"]), (signal.SIGTERM, ONE)],
                         ids=["sigusr1-ddp2", "sigterm-1proc"])
def test_signal_saves_a_checkpoint_and_fit_resumes(data, tmp_path, sig, procs):
    """A signal mid-run: the step finishes, a valid checkpoint is written, exit 75 (requeue); fit resumes from it.
    With ddp x2 (processes Lightning starts itself) the signal goes to rank 0 only: both ranks stop together."""
    out = tmp_path / "run"
    p = start([*CLI, *fit_cmd(data, out, "trainer.max_steps=2000", "checkpoint.every_steps=1000", *procs)])
    try:
        _wait_for_steps(out, p, 3)
        os.kill(p.pid, sig)
        text = finish([p], timeout=120, expect=75)[0]
    finally:
        kill([p])
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1 and is_valid(ckpts[0]), ckpts
    step = int(ckpts[0].stem.split("-")[1])
    assert step >= 3 and f"stopped by a signal after step {step}" in text
    text = fit(data, out, f"trainer.max_steps={step + 2}", "checkpoint.every_steps=1000", *procs)
    assert f"resuming from {ckpts[0]}" in text and f"done: step {step + 2}" in text
    assert sorted(losses(out))[-2:] == [step + 1, step + 2]


@pytest.mark.slow
def test_zero2_cpu_step(tmp_path):
    """DeepSpeed ZeRO-2 (the config `deepspeed_stage_2` derives from the recipe) takes real steps on CPU."""
    pytest.importorskip("deepspeed")
    dims = [a for a in TINY if a.startswith(("model.", "data.chunk_len", "data.n_chunks", "data.batch_size"))]
    cmd = [*TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "tests" / "dist_zero2_step.py"), "recipes/tiny.yaml", *dims]
    out = finish([start(cmd, DS_ACCELERATOR="cpu")], timeout=1800)[0]
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert result["world"] == 2 and result["losses"][-1] < result["losses"][0], result


@pytest.mark.gpu
def test_lightning_deepspeed_stage2_fit_on_gpu(data, tmp_path):
    """The Lightning DeepSpeed path: `fit` with trainer.strategy=deepspeed_stage_2 on one GPU trains."""
    pytest.importorskip("deepspeed")
    gpu = [a for a in TINY if a != "trainer.accelerator=cpu"] + ["trainer.accelerator=gpu", "trainer.devices=1",
                                                                  "trainer.strategy=deepspeed_stage_2"]
    out = tmp_path / "ds"
    cmd = [*CLI, "fit", "recipes/tiny.yaml", f"data.path={data}", f"logging.out_dir={out}", *gpu,
           "trainer.max_steps=6", "checkpoint.every_steps=100", "data.num_workers=1"]
    text = finish([start(cmd)], 600)[0]
    assert "done: step 6" in text, text[-3000:]
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and got[6] < got[1], got
