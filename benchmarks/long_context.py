"""Long windows with truncated backprop: activation memory per `train.tbptt_chunks`, and loss by position.

    # activation memory (peak bytes autograd saves for backward) of one training window per setting
    .venv/bin/python benchmarks/long_context.py memory recipes/long/tiny_mag.yaml --tbptt 1 2 4 8 16
    # loss by sequence-chunk index on held-out long documents (validation-split documents of at least one window,
    # each cut into whole windows that start with a fresh state), for several checkpoints side by side
    .venv/bin/python benchmarks/long_context.py eval runs/a/checkpoints/last.ckpt runs/b/checkpoints/last.ckpt \
        --data data/builtin --chunk-len 128 --n-chunks 16

`memory` measures on any device (titans_train.train.callbacks.memory.saved_tensor_peak); on CUDA it also prints
torch.cuda.max_memory_allocated. Host RSS is printed for reference only: it also holds weights, gradients,
the optimiser and pages the allocator keeps. Run on a shared machine, timings mean nothing here; bytes do.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def memory(args) -> None:
    from titans_train.train import build as B
    from titans_train.train.callbacks.memory import peak_rss_gib, saved_tensor_peak
    from titans_train.train.tbptt import window_step

    recipe, _ = B.load_recipe(args.recipe, args.overrides)
    d = recipe.data
    torch.manual_seed(0)
    model = B.build_model(recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    print(f"{args.recipe}: {d.batch_size} rows x {d.n_chunks} chunks x {d.chunk_len} tokens, "
          f"{model.count_params() / 1e6:.2f}M parameters, {device}; load {os.getloadavg()}")
    settings = [("1-chunk window", 1, 1)] + [(f"tbptt_chunks={k}", d.n_chunks, k) for k in args.tbptt]
    base = None
    for name, n_chunks, k in settings:
        tokens = torch.randint(0, recipe.model.vocab_size, (d.batch_size, n_chunks * d.chunk_len + 1), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with saved_tensor_peak() as meter:
            window_step(model, tokens, None, chunk_len=d.chunk_len, tbptt_chunks=k, backward=lambda l: l.backward())
        model.zero_grad(set_to_none=True)
        base = base or meter.peak
        cuda = f", cuda peak {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB" if device.type == "cuda" else ""
        print(f"  {name:16s} saved for backward: peak {meter.peak / 2**20:8.2f} MiB ({meter.peak / base:5.2f}x the "
              f"1-chunk window){cuda}; process peak RSS {peak_rss_gib():.2f} GiB")


def long_windows(data: str, window: int, max_windows: int) -> torch.Tensor:
    """(N, window + 1) token windows from validation documents of at least window + 1 tokens, each cut from the
    document's start on in whole windows (no packing: a window never crosses into another document)."""
    from titans_train.data.shards import Manifest, iter_shard

    rows = []
    for shard in Manifest(data).shards("validation"):
        for doc in iter_shard(shard):
            for s in range(0, len(doc) - window, window):
                rows.append(np.asarray(doc[s : s + window + 1], dtype=np.int64))
    if not rows:
        raise SystemExit(f"{data}: no validation document has {window + 1} tokens")
    return torch.from_numpy(np.stack(rows[:max_windows]))


@torch.no_grad()
def evaluate(args) -> None:
    from titans_train.train import build as B
    from titans_train.train.tbptt import window_step

    window = args.chunk_len * args.n_chunks
    rows = long_windows(args.data, window, args.max_windows)
    print(f"{len(rows)} windows of {args.n_chunks} x {args.chunk_len} tokens from validation documents of "
          f">= {window + 1} tokens ({args.data}); load {os.getloadavg()}")
    table = {}
    for ckpt in args.ckpts:
        recipe, _, model = B.load_model_from_checkpoint(ckpt)
        model.eval()
        total = torch.zeros(args.n_chunks, dtype=torch.float64)
        for i in range(0, len(rows), args.batch_size):
            batch = rows[i : i + args.batch_size]
            start = torch.zeros_like(batch, dtype=torch.bool)
            start[:, 0] = True
            total += window_step(model, batch, start, chunk_len=args.chunk_len, tbptt_chunks=args.n_chunks,
                                 backward=None).double() * len(batch)
        table[ckpt] = total / len(rows)
    print("chunk " + " ".join(f"{i:>6d}" for i in range(args.n_chunks)) + "   mean  last-4")
    for ckpt, loss in table.items():
        print(f"{ckpt}\n      " + " ".join(f"{v:6.3f}" for v in loss.tolist())
              + f"  {float(loss.mean()):6.3f}  {float(loss[-4:].mean()):6.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("recipe")
    m.add_argument("overrides", nargs="*")
    m.add_argument("--tbptt", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    e = sub.add_parser("eval")
    e.add_argument("ckpts", nargs="+")
    e.add_argument("--data", default="data/builtin")
    e.add_argument("--chunk-len", type=int, default=128)
    e.add_argument("--n-chunks", type=int, default=16)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--max-windows", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    memory(args) if args.cmd == "memory" else evaluate(args)


if __name__ == "__main__":
    main()
