"""`titans-train launch slurm`, strategy construction from the recipe, and Lightning under SLURM variables.

All in-process and fast: rendering, `bash -n` on the script, every preflight refusal, the DeepSpeed config
derived from a recipe (and a user JSON over it), and a Trainer built with the variables srun sets, which must
take rank, world size and node rank from them (the multi-process runs are in test_dist_strategies.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from titans_train.cli import main
from titans_train.config import load
from titans_train.train.slurm import preflight, render

RECIPE = "recipes/mag_760m.yaml"


def recipe(*overrides):
    return load(RECIPE, list(overrides))[0]


def launch(capsys, *args):
    rc = main(["launch", "slurm", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_dry_run_renders_a_valid_script(capsys, tmp_path):
    rc, script, _ = launch(capsys, RECIPE, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                           "--account", "proj", "--time", "12:00:00", "--dry-run", "trainer.strategy=fsdp",
                           "launch.global_batch=512", "logging.run_name=mag760")
    assert rc == 0
    f = tmp_path / "job.sbatch"
    f.write_text(script)
    r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=12:00:00",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --job-name=mag760",
                 "#SBATCH --output=slurm_logs/%x-%j.out", "scontrol requeue"]:
        assert line in script, line
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    for arg in ["titans-train fit recipes/mag_760m.yaml", "trainer.strategy=fsdp", "trainer.devices=8",
                "trainer.num_nodes=4", "trainer.accelerator=gpu", "data.batch_size=16"]:  # 512 / 32 ranks
        assert arg in srun, (arg, srun)
    assert "{{" not in script


def test_template_itself_passes_bash_n():
    from titans_train.train.slurm import TEMPLATE

    assert subprocess.run(["bash", "-n", str(TEMPLATE)]).returncode == 0


@pytest.mark.parametrize("overrides,nodes,gpus,needle", [
    (["trainer.devices=4"], 1, 8, "trainer.devices=4 but --gpus-per-node 8"),
    (["trainer.num_nodes=2"], 4, 8, "trainer.num_nodes=2 but --nodes 4"),
    (["launch.global_batch=100"], 2, 8, "launch.global_batch=100 is not divisible by world size 16"),
    (["launch.global_batch=64", "train.accumulate_windows=8"], 1, 16, "multiple of 128"),
    (["trainer.accelerator=cpu"], 1, 8, "trainer.accelerator=cpu in a GPU job"),
    (["trainer.fsdp_cpu_offload=true"], 1, 8, "fsdp_cpu_offload=true needs trainer.strategy=fsdp"),
    ([], 1, 0, "--gpus-per-node 0 must be >= 1"),
], ids=["devices-vs-tasks", "nodes", "global-batch", "global-batch-accum", "cpu", "offload", "no-gpus"])
def test_preflight_refuses(overrides, nodes, gpus, needle, capsys):
    problems = preflight(recipe(*overrides), nodes, gpus)
    assert any(needle in p for p in problems), problems
    rc, out, err = launch(capsys, RECIPE, "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--dry-run",
                          *overrides)
    assert rc == 2 and out == "" and "refusing to launch" in err and needle in err


def test_preflight_collects_every_problem():
    problems = preflight(recipe("trainer.devices=2", "trainer.accelerator=cpu", "launch.global_batch=7"), 2, 8)
    assert len(problems) == 3, problems


def test_submit_without_sbatch_is_a_clear_error(capsys, tmp_path, monkeypatch):
    if shutil.which("sbatch"):
        pytest.skip("a real sbatch is on PATH")
    monkeypatch.chdir(tmp_path)
    rc, _, err = launch(capsys, str(__import__("pathlib").Path(__file__).parents[1] / RECIPE), "--nodes", "1",
                        "--gpus-per-node", "8", "launch.log_dir=logs")
    assert rc == 2 and "sbatch not found" in err and (tmp_path / "logs" / "mag_760m.sbatch").is_file()  # <logging.run_name>.sbatch


# --- strategies from the recipe -----------------------------------------------------------------------------------


def test_strategy_names():
    from lightning.pytorch.strategies import DDPStrategy

    from titans_train.train.strategies import FSDP2Strategy, build_strategy

    s = build_strategy(recipe("trainer.strategy=ddp", "trainer.accelerator=cpu"), precision="32-true")
    assert isinstance(s, DDPStrategy)
    s = build_strategy(recipe("trainer.strategy=fsdp", "trainer.fsdp_cpu_offload=true"), precision="bf16-mixed")
    assert isinstance(s, FSDP2Strategy) and s.cpu_offload and s.bf16
    with pytest.raises(ValueError, match="trainer.strategy: must be one of"):
        recipe("trainer.strategy=fsdp1")


def test_deepspeed_refused_on_cpu():
    from titans_train.cli import UserError
    from titans_train.train.strategies import build_strategy, check_strategy

    r = recipe("trainer.strategy=deepspeed_stage_2", "trainer.accelerator=cpu")
    assert any("needs GPUs" in p for p in check_strategy(r, has_gpu=False))
    with pytest.raises(UserError, match="needs GPUs"):
        build_strategy(r, precision="32-true")


def test_deepspeed_config_from_the_recipe_and_a_user_json(tmp_path):
    from titans_train.train.strategies import check_strategy, deepspeed_config

    cfg = deepspeed_config(recipe("trainer.strategy=deepspeed_stage_3", "optim.grad_clip=0.5", "data.batch_size=3"),
                           precision="bf16-mixed")
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert cfg["gradient_clipping"] == 0.5 and cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and "gradient_accumulation_steps" not in cfg

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}, "overlap_comm": False},
                                "gradient_clipping": 2.0}))
    r = recipe("trainer.strategy=deepspeed_stage_2", f"trainer.deepspeed_config={user}")
    cfg = deepspeed_config(r, precision="bf16-mixed")
    z = cfg["zero_optimization"]
    assert z["stage"] == 2 and z["contiguous_gradients"] and not z["overlap_comm"]  # merged key by key
    assert z["offload_optimizer"] == {"device": "cpu"} and cfg["gradient_clipping"] == 2.0
    assert check_strategy(r, has_gpu=True) == []

    user.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    with pytest.raises(ValueError, match="train.accumulate_windows"):
        deepspeed_config(r)
    assert any("no such file" in p for p in check_strategy(recipe("trainer.strategy=deepspeed_stage_2",
                                                                  "trainer.deepspeed_config=nope.json"), has_gpu=True))


def test_deepspeed_strategy_object(tmp_path):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from titans_train.train.strategies import build_strategy

    r = recipe("trainer.strategy=deepspeed_stage_2", "trainer.accelerator=gpu")
    import titans_train.train.strategies as S

    orig = S.check_strategy
    try:
        S.check_strategy = lambda rec, has_gpu=None: orig(rec, has_gpu=True)  # build it here without a GPU
        s = build_strategy(r, precision="bf16-mixed")
    finally:
        S.check_strategy = orig
    assert isinstance(s, DeepSpeedStrategy) and s.config["zero_optimization"]["stage"] == 2


# --- Lightning under SLURM's variables -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lightning_reads_rank_world_and_node_from_slurm(monkeypatch, strategy):
    """What srun sets for task 3 of 2 nodes x 2 tasks: Lightning's SLURM environment (our requeue, not its own)."""
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from titans_train.train.strategies import build_strategy, cluster_plugins

    for k, v in dict(SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="2", SLURM_PROCID="3",
                     SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_JOB_ID="1234", SLURM_JOB_NAME="titans",
                     SLURM_NODELIST="node[7-8]").items():
        monkeypatch.setenv(k, v)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    # Building the Trainer sets the process-wide rank_zero_only.rank to 3: restore it afterwards, or every later
    # test in this process believes it is rank 3 and its rank-zero loggers (CSV) write nothing.
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning_utilities.core import rank_zero as utils_rank_zero

    for mod in (fabric_rank_zero, utils_rank_zero):
        monkeypatch.setattr(mod.rank_zero_only, "rank", mod.rank_zero_only.rank)
    r = recipe(f"trainer.strategy={strategy}", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=2")
    plugins = cluster_plugins()
    assert len(plugins) == 1 and isinstance(plugins[0], SLURMEnvironment) and not plugins[0].auto_requeue
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy=build_strategy(r, precision="32-true"),
                        plugins=plugins, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (trainer.global_rank, trainer.world_size, trainer.node_rank, trainer.local_rank) == (3, 4, 1, 1)
    assert env.main_address == "node7"
