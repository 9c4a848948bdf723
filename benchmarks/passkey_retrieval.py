"""Passkey retrieval beyond the training length: train one tiny variant as tests/test_eval_passkey.py does and
print its accuracy per prompt length (BENCHMARKS.md, long-context evaluation).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/passkey_retrieval.py mag --steps 300 --samples 20 --seed 0
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tests.test_eval_passkey import accuracy, train_passkey


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("variant", choices=("lmm", "mac", "mag", "mal", "transformer"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="training seed (accuracy beyond the horizon varies with it)")
    p.add_argument("--samples", type=int, default=20, help="per length, spread over 5 depths")
    p.add_argument("--lengths", default="512,2048,8192,32768")
    args = p.parse_args()
    torch.set_num_threads(1)
    t, cpu = time.time(), time.process_time()
    model = train_passkey(args.variant, args.steps, seed=args.seed)
    print(f"{args.variant} seed {args.seed}: trained {args.steps} steps in {time.time() - t:.0f} s wall, "
          f"{time.process_time() - cpu:.0f} s CPU; load {os.getloadavg()}", flush=True)
    for length in map(int, args.lengths.split(",")):
        t = time.time()
        print(f"{args.variant} {length}: accuracy {accuracy(model, length, args.samples):.2f} "
              f"({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
