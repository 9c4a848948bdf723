"""`titans-train launch slurm RECIPE --nodes N --gpus-per-node G [...] [key=value ...]`: a multi-node SLURM job.

Renders `launch/sbatch.template` (one srun task per GPU, Lightning's SLURM environment, requeue on SIGUSR1 with
a checkpoint and automatic resume, one log file per job), prints it with `--dry-run`, otherwise writes it next
to the logs and submits it with `sbatch`. A preflight check first refuses settings that cannot work, each
problem named in one message. See launch/README.md.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from titans_train.train.build import REPO_ROOT

TEMPLATE = REPO_ROOT / "launch" / "sbatch.template"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scheduler", choices=["slurm"], help="the cluster scheduler (only slurm)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/mag_760m.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides passed on to `fit`")
    p.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (= srun tasks per node)")
    p.add_argument("--partition", default=None, help="sbatch --partition (default: launch.partition)")
    p.add_argument("--account", default=None, help="sbatch --account (default: launch.account)")
    p.add_argument("--time", default=None, help="sbatch --time, e.g. 24:00:00 (default: launch.time)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")


def run(args: argparse.Namespace) -> int:
    import subprocess

    from titans_train.cli import UserError
    from titans_train.train import build as B

    recipe, _ = B.load_recipe(args.recipe, args.overrides)
    problems = preflight(recipe, args.nodes, args.gpus_per_node)
    if problems:
        raise UserError("refusing to launch: " + "; ".join(problems))
    script = render(recipe, args.recipe, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                    partition=args.partition, account=args.account, time=args.time)
    if args.dry_run:
        print(script, end="")
        return 0
    path = Path(recipe.launch.log_dir) / f"{recipe.logging.run_name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    try:
        r = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(f"sbatch not found (not on a SLURM login node?); the script is in {path}, "
                        "or print it with --dry-run") from None
    if r.returncode != 0:
        raise UserError(f"sbatch {path} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    print(f"{r.stdout.strip()} (script {path}, logs in {recipe.launch.log_dir}/)")
    return 0


def per_device_batch(recipe, world: int) -> int:
    """`data.batch_size` for this world size: from `launch.global_batch` when set, else the recipe's."""
    g = recipe.launch.global_batch
    return recipe.data.batch_size if g is None else g // (world * recipe.train.accumulate_windows)


def preflight(recipe, nodes: int, gpus_per_node: int) -> list[str]:
    """Every reason the job cannot run as asked (empty when it can); each names the keys or flags involved."""
    from titans_train.train.strategies import check_strategy

    problems = []
    if nodes < 1:
        problems.append(f"--nodes {nodes} must be >= 1")
    if gpus_per_node < 1:
        problems.append(f"--gpus-per-node {gpus_per_node} must be >= 1 (srun starts one task per GPU)")
    if problems:
        return problems
    t, world = recipe.trainer, nodes * gpus_per_node
    if t.devices != "auto" and t.devices != gpus_per_node:
        problems.append(f"trainer.devices={t.devices} but --gpus-per-node {gpus_per_node}: srun starts one task per "
                        f"GPU and Lightning needs devices = tasks per node (set trainer.devices=auto or {gpus_per_node})")
    if t.num_nodes not in (1, nodes):
        problems.append(f"trainer.num_nodes={t.num_nodes} but --nodes {nodes}")
    if t.accelerator == "cpu":
        problems.append("trainer.accelerator=cpu in a GPU job (set it to auto or gpu)")
    problems += check_strategy(recipe, has_gpu=True)
    g, accum = recipe.launch.global_batch, recipe.train.accumulate_windows
    if g is not None and g % (world * accum):
        problems.append(f"launch.global_batch={g} is not divisible by world size {world} x train.accumulate_windows="
                        f"{accum}: choose a global batch that is a multiple of {world * accum}")
    return problems


def render(recipe, recipe_path: str, overrides: list[str], *, nodes: int, gpus_per_node: int,
           partition: str | None = None, account: str | None = None, time: str | None = None,
           workdir: str | None = None) -> str:
    """The sbatch script for this recipe (see launch/sbatch.template)."""
    L, world = recipe.launch, nodes * gpus_per_node
    fit_args = ["titans-train", "fit", recipe_path, *overrides, "trainer.accelerator=gpu",
                f"trainer.devices={gpus_per_node}", f"trainer.num_nodes={nodes}"]
    if L.global_batch is not None:
        fit_args.append(f"data.batch_size={per_device_batch(recipe, world)}")
    options = []
    if partition or L.partition:
        options.append(f"#SBATCH --partition={partition or L.partition}")
    if account or L.account:
        options.append(f"#SBATCH --account={account or L.account}")
    options += [f"#SBATCH {o}" for o in L.sbatch_extra]
    batch = per_device_batch(recipe, world)
    options.append(f"# global batch: {batch} windows x {world} ranks x {recipe.train.accumulate_windows} accumulated = "
                   f"{batch * world * recipe.train.accumulate_windows} windows of {recipe.data.window_len() - 1} "
                   f"tokens per optimiser step; strategy {recipe.trainer.strategy}")
    fields = {
        "job_name": recipe.logging.run_name,
        "nodes": str(nodes),
        "gpus_per_node": str(gpus_per_node),
        "cpus_per_task": str(L.cpus_per_task),
        "time": time or L.time,
        "log_dir": shlex.quote(L.log_dir),
        "signal_seconds": str(L.signal_seconds),
        "sbatch_options": "\n".join(options),
        "workdir": shlex.quote(workdir or str(Path.cwd())),
        "setup": L.setup,
        "command": " ".join(shlex.quote(a) for a in fit_args),
    }
    text = TEMPLATE.read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    return text
