"""Loader throughput: packed tokens/s of the training stream with 2 DataLoader workers, against what training the
170M recipe on one H100 consumes (estimated from FLOPs; the assumptions are printed).

    .venv/bin/python benchmarks/data_loader.py                 # prepares its corpora in a temp dir (no network)
    .venv/bin/python benchmarks/data_loader.py --data data/fineweb-edu --seconds 30

Corpora (when --data is not given): `builtin` (the Python stdlib, byte tokens; long documents, ~17K tokens each)
and `short` (generated documents of ~1,000 tokens, about FineWeb-Edu's mean with the Llama-2 tokenizer, so a
window is packed from ~65 pieces per 64K tokens). Tokens are stored as uint16 either way, as for a 32K vocabulary.
Every batch is committed (cursor recorded) as the DataModule does in training.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from titans_train.cli import main as cli  # noqa: E402
from titans_train.data.shards import Manifest  # noqa: E402
from titans_train.data.stream import PackedStream  # noqa: E402

# --- the consumption side: 170M recipe on one H100 ----------------------------------------------------------------
H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM bf16 dense peak
# Training FLOPs per token (forward + backward) of the 170M recipes at T = 4096, from the models' own count
# (`titans-train info recipes/<variant>_170m.yaml`). The smallest one consumes tokens fastest: we compare with it.
# For reference, 6N + 6*L*d*T (N = 170M, L = 12, d = 768, causal attention) = 1.25 GFLOP.
FLOPS_PER_TOKEN_170M = {"lmm": 0.988e9, "transformer": 1.096e9, "mag": 1.172e9, "mal": 1.172e9, "mac": 1.236e9}


def train_tokens_per_s(mfu: float, flops_per_token: float = min(FLOPS_PER_TOKEN_170M.values())) -> float:
    """Tokens/s that one H100 trains a 170M model at, at model-FLOPs utilisation `mfu`."""
    return H100_BF16_DENSE * mfu / flops_per_token


def make_short_corpus(path: Path, n_docs: int, seed: int = 0):
    rng = random.Random(seed)
    words = [("".join(rng.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(rng.randint(1, 9)))) for _ in range(5000)]
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = max(20, int(rng.expovariate(1 / 180)))  # ~180 words ~ 1,000 characters
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n")


def measure(data: Path, args) -> dict:
    m = Manifest(data)
    L1 = args.chunk_len * args.n_chunks + 1
    stream = PackedStream(m, "train", window_len=L1, batch_size=args.batch_size, num_workers=args.workers,
                          shuffle_buffer=args.shuffle_buffer, seed=0)
    dl = DataLoader(stream, batch_size=None, num_workers=args.workers, persistent_workers=args.workers > 0,
                    prefetch_factor=4 if args.workers else None)
    it = iter(dl)
    for _ in range(args.warmup):
        stream.commit(next(it))
    n_batches, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        b = next(it)
        stream.commit(b)
        n_batches += 1
    dt = time.perf_counter() - t0
    tokens = n_batches * args.batch_size * (L1 - 1)  # predicted tokens (targets)
    epochs = min(lane[0] for lane in stream.state_dict()["cursors"][0])  # epochs every lane of stream 0 finished
    return {"tokens_per_s": tokens / dt, "batches": n_batches, "seconds": dt, "epochs_done": epochs,
            "docs": m.data["splits"]["train"]["docs"], "tokens": m.data["splits"]["train"]["tokens"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a prepared dataset (default: prepare `builtin` and `short` in a temp dir)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-len", type=int, default=4096)
    p.add_argument("--n-chunks", type=int, default=16, help="16 x 4096 = 64K-token windows (1 for plain 4K rows)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--shuffle-buffer", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=int, default=3, help="batches before timing (worker start-up)")
    p.add_argument("--short-docs", type=int, default=20000)
    args = p.parse_args()
    torch.set_num_threads(1)

    datasets = {}
    tmp = tempfile.TemporaryDirectory()
    if args.data:
        datasets[args.data] = Path(args.data)
    else:
        root = Path(tmp.name)
        cli(["prepare", "builtin", "--out", str(root / "builtin"), "--no-progress"])
        make_short_corpus(root / "short.jsonl", args.short_docs)
        cli(["prepare", str(root / "short.jsonl"), "--out", str(root / "short"), "--no-progress"])
        datasets = {"builtin": root / "builtin", "short": root / "short"}

    need = {mfu: train_tokens_per_s(mfu) for mfu in (0.4, 0.5)}
    print(f"\nwindow {args.n_chunks} x {args.chunk_len} + 1 tokens, batch {args.batch_size}, {args.workers} workers, "
          f"{args.seconds:.0f} s per corpus, torch {torch.__version__}")
    print(f"170M on one H100 (bf16 dense peak {H100_BF16_DENSE / 1e12:.0f} TFLOP/s), training FLOPs/token at T=4096: "
          + ", ".join(f"{k} {v / 1e9:.3f}G" for k, v in FLOPS_PER_TOKEN_170M.items()) + "; the smallest is used")
    for mfu, tps in need.items():
        print(f"  at {mfu:.0%} MFU training consumes {tps:,.0f} tokens/s")
    print(f"{'corpus':<10} {'docs':>8} {'tokens':>12} {'batches':>8} {'loader tokens/s':>16} "
          f"{'x need@40%':>11} {'x need@50%':>11}")
    for name, path in datasets.items():
        r = measure(path, args)
        print(f"{name:<10} {r['docs']:>8,} {r['tokens']:>12,} {r['batches']:>8} {r['tokens_per_s']:>16,.0f} "
              f"{r['tokens_per_s'] / need[0.4]:>10.1f}x {r['tokens_per_s'] / need[0.5]:>10.1f}x")
    tmp.cleanup()


if __name__ == "__main__":
    main()
