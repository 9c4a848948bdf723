"""Training-step time of a model with the fused CPU kernels (`titans_train/ops/fused.py`) on and off, interleaved.

Builds `benchmarks/model_throughput.py`'s model of a variant (dim 256, 4 blocks, 4 heads, memory chunk 16, window
128), warms it up with a 512-token step, then alternates full training steps (forward, backward, AdamW; batch 1, T
tokens) with the kernels off (the same math as PyTorch ops) and on, and prints every step, the best of each and
their ratio, and the machine's load.

    python benchmarks/fused_kernels.py --variant lmm --T 8192 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from titans_train.cli import cpu_runtime_defaults, flush_denormals  # noqa: E402

cpu_runtime_defaults(training=True)

import torch  # noqa: E402

import model_throughput as mt  # noqa: E402
from titans_train.ops import fused  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="lmm", choices=mt.OURS)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    flush_denormals()
    if not fused.available():
        sys.exit(f"the fused kernels did not build: {fused._KERNEL.error}")
    dims = argparse.Namespace(dim=256, layers=4, heads=4)
    model = mt.build(args.variant, args.T, dims)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step(n: int) -> float:
        tokens = torch.randint(0, mt.VOCAB, (1, n + 1), generator=g)
        t0 = time.perf_counter()
        mt.loss_of(model, args.variant, tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    build = fused._KERNEL.module
    print(f"{args.variant} T={args.T} threads={args.threads} load {os.getloadavg()}", flush=True)
    step(512)
    times = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in ("off", "on"):
            fused._KERNEL.module = build if mode == "on" else (lambda: None)
            times[mode].append(step(args.T))
            print(f"round {r} fused {mode}: {times[mode][-1]:.2f} s", flush=True)
    fused._KERNEL.module = build
    off, on = min(times["off"]), min(times["on"])
    print(f"best: off {off:.2f} s ({args.T / off:,.0f} tok/s), on {on:.2f} s ({args.T / on:,.0f} tok/s), "
          f"speed-up {off / on:.3f}x; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
