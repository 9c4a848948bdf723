"""Training windows with a carried memory state, with and without flushing subnormal floats to zero.

A mini MAG (`recipes/mini_mag.yaml`, untrained) whose forgetting gate is set strong (`--alpha-bias`, sigmoid space:
-2.75 gives alpha 0.06 per token, the largest the session-7 LMM learnt on runs of spaces) reads `--windows`
consecutive 512-token windows of 8 rows, the state carried detached from each into the next as `titans-train fit`
carries it across sequence chunks; each window is a forward and backward. The fast weights decay through the float32
subnormal range (below 1.2e-38) on their way to zero, where x86 arithmetic takes a microcode assist per operation.
Each mode runs in its own process (one thread each; `--parallel` runs the two at once on two cores); prints seconds
per window and the state's subnormal count.

    python benchmarks/denormals.py --windows 16 --parallel
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(flush: bool, alpha_bias: float, windows: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from titans_train.config import load_recipe
    from titans_train.layers.neural_memory import NeuralMemory
    from titans_train.models import build_model

    torch.set_num_threads(1)
    torch.set_flush_denormal(flush)
    cfg = load_recipe(ROOT / "recipes" / "mini_mag.yaml", ["model.mlp_hidden=80"])
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NeuralMemory):
                m.rates.bias.view(m.heads, -1)[:, -1] = alpha_bias
    x = torch.randint(0, cfg["model"]["vocab_size"], (8, 512 * windows + 1), generator=torch.Generator().manual_seed(0))
    state = None
    for w in range(windows):
        xi = x[:, w * 512:(w + 1) * 512 + 1]
        t0 = time.perf_counter()
        logits, state = model(xi[:, :-1], state, None)
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), xi[:, 1:].reshape(-1)).backward()
        dt = time.perf_counter() - t0
        state = state.detach()
        values = [t for t in state.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        sub = sum(int(((t != 0) & (t.abs() < torch.finfo(torch.float32).tiny)).sum()) for t in values)
        print(f"flush={int(flush)} window {w:2d} {dt:6.2f} s  subnormal state values {sub:,}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--alpha-bias", type=float, default=-2.75)
    p.add_argument("--parallel", action="store_true", help="run both modes at once (one core each)")
    p.add_argument("--child", type=int, choices=(0, 1), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(bool(args.child), args.alpha_bias, args.windows)
    print(f"load {os.getloadavg()}", flush=True)
    cmd = [sys.executable, __file__, "--windows", str(args.windows), "--alpha-bias", str(args.alpha_bias), "--child"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    if args.parallel:
        procs = [subprocess.Popen([*cmd, flag], env=env) for flag in ("0", "1")]
        for proc in procs:
            proc.wait()
    else:
        for flag in ("1", "0"):
            subprocess.run([*cmd, flag], env=env, check=True)
    print(f"load {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
