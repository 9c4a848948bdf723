"""Whole-model benchmarks: training tokens/s and peak memory against T, streaming, generation per token.

Three parts (`--parts`):
  train     training steps (forward + backward + AdamW; the best of `--steps`, the first of which also first-touches
            the step's memory) of every variant and of Transformer++ with full causal attention, at each T of `--T`
            (batch 1, float32), plus titans-pytorch's MemoryAsContextTransformer at matched width/depth/heads/segment
            (`tp_mac144`: its default memory chunk, segment + long-term memory tokens = 144; `tp_mac16`: memory
            chunk 16, its closest setting to ours). Interleaved: every round runs each (case, T) once, best of
            `--rounds`.
  stream    feed `--stream-tokens` tokens (default 2,097,152) in pieces of `--piece` through the state (no grad),
            MAG and LMM; and the same for 16K tokens, whose peak RSS is the reference.
  generate  time per generated token (`--gen-tokens`, greedy, through the state) after a 512- and a 32K-token prompt.

Every measurement runs in its own subprocess (so its peak memory is its own) with the CPU runtime defaults that
`titans-train` sets (`titans_train.cli.cpu_runtime_defaults`: OMP_WAIT_POLICY=PASSIVE, THP_MEM_ALLOC_ENABLE=1, and
for training MALLOC_MMAP_MAX_=0) unless the environment sets them. "peak MiB" is the growth of the process's max RSS
(`ru_maxrss`) over its RSS after building the model (and optimizer) and one warm-up step on min(T, 512) tokens:
what the length adds; for `stream` also the absolute max RSS. The machine's load (os.getloadavg) is printed with
every result. Results: a table on stdout, `--out` JSON, and a log-log PNG of tokens/s and peak memory against T
(matplotlib, `bench`).

    python benchmarks/model_throughput.py                                  # everything, ~1 h on 2 cores
    python benchmarks/model_throughput.py --parts train --T 1024 2048 --variants mag transformer --rounds 3
    python benchmarks/model_throughput.py --parts stream --stream-tokens 131072
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from titans_train.cli import cpu_runtime_defaults, flush_denormals

OURS = ["transformer", "lmm", "mag", "mal", "mac"]
TITANS_PYTORCH = ["tp_mac144", "tp_mac16"]
VOCAB = 257  # byte tokens + EOS, as recipes/base/tiny.yaml


def model_config(variant: str, max_len: int, dim: int, layers: int, heads: int):
    from titans_train.config import ModelConfig

    full = variant == "transformer"
    return ModelConfig(variant=variant, vocab_size=VOCAB, dim=dim, n_layers=layers, heads=heads,
                       max_seq_len=max(max_len, 128), window=None if full else 128, n_persistent=0 if full else 8,
                       segment_len=128, mac_memory_tokens=64, memory=dict(chunk_size=16))


def build(case: str, max_len: int, args) -> torch.nn.Module:
    torch.manual_seed(0)
    if case in OURS:
        from titans_train.models import build_model

        return build_model(model_config(case, max_len, args.dim, args.layers, args.heads))
    from titans_pytorch import MemoryAsContextTransformer

    chunk = {"tp_mac144": None, "tp_mac16": 16}[case]  # None: segment_len + num_longterm_mem_tokens = 144
    model = MemoryAsContextTransformer(
        num_tokens=VOCAB, dim=args.dim, depth=args.layers, heads=args.heads, dim_head=args.dim // args.heads,
        segment_len=128, num_longterm_mem_tokens=16, num_persist_mem_tokens=8, neural_memory_segment_len=chunk,
        num_residual_streams=1,  # a plain residual stream, as ours (its default 4 hyper-connection streams is slower)
        neural_memory_kwargs=dict(heads=args.heads, dim_head=args.dim // args.heads,
                                  default_model_kwargs=dict(depth=2, expansion_factor=4.0)))
    for param in model.parameters():  # some are expanded views, which AdamW's in-place update refuses
        param.data = param.data.clone()
    return model


def loss_of(model, case: str, tokens: torch.Tensor) -> torch.Tensor:
    if case in OURS:
        logits, _ = model(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    return model(tokens, return_loss=True)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_train(case: str, T: int, args) -> dict:
    model = build(case, T, args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step(n: int) -> None:
        tokens = torch.randint(0, VOCAB, (1, n + 1), generator=g)
        loss_of(model, case, tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(min(T, 512))  # warm-up: lazy init, kernel load, optimizer state
    base = max(rss_mib(), max_rss_mib())
    times = []
    for _ in range(args.steps):  # the first step at T also pays for first-touching its activations' memory
        t0 = time.perf_counter()
        step(T)
        times.append(time.perf_counter() - t0)
    return {"part": "train", "case": case, "T": T, "seconds": min(times), "step_seconds": times,
            "tokens_per_s": T / min(times), "peak_mib": max_rss_mib() - base}


@torch.no_grad()
def run_stream(case: str, total: int, args) -> dict:
    model = build(case, args.piece, args).eval()
    g = torch.Generator().manual_seed(0)
    model(torch.randint(0, VOCAB, (1, min(args.piece, 512)), generator=g))  # warm-up
    base = max(rss_mib(), max_rss_mib())
    state, t0, report, progress = None, time.perf_counter(), 16384, []
    for start in range(0, total, args.piece):
        _, state = model(torch.randint(0, VOCAB, (1, min(args.piece, total - start)), generator=g), state)
        if state.pos >= report and state.pos < total:  # progress: RSS now and max so far, at each power of two
            progress.append({"tokens": state.pos, "seconds": time.perf_counter() - t0, "rss_mib": rss_mib(),
                             "max_rss_mib": max_rss_mib()})
            print("PROGRESS " + json.dumps(progress[-1]), file=sys.stderr, flush=True)
            report *= 2
    seconds = time.perf_counter() - t0
    return {"part": "stream", "case": case, "T": total, "seconds": seconds, "tokens_per_s": total / seconds,
            "peak_mib": max_rss_mib() - base, "max_rss_mib": max_rss_mib(), "rss_mib": rss_mib(),
            "progress": progress}


@torch.no_grad()
def run_generate(case: str, prompt_len: int, args) -> dict:
    model = build(case, prompt_len, args).eval()
    g = torch.Generator().manual_seed(0)
    state = None
    for start in range(0, prompt_len, args.piece):  # the prompt, in pieces through the state
        _, state = model(torch.randint(0, VOCAB, (1, min(args.piece, prompt_len - start)), generator=g), state)
    nxt = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(4):  # warm-up
        logits, state = model(nxt, state)
        nxt = logits[:, -1:].argmax(-1)
    n, t0 = args.gen_tokens, time.perf_counter()
    for _ in range(n):
        logits, state = model(nxt, state)
        nxt = logits[:, -1:].argmax(-1)
    per_token = (time.perf_counter() - t0) / n
    return {"part": "generate", "case": case, "T": prompt_len, "seconds": per_token, "ms_per_token": per_token * 1e3}


def child(args) -> int:
    torch.set_num_threads(args.threads)
    flush_denormals()  # as titans-train does: a long stream's state decays through the subnormal range
    fn = {"train": run_train, "stream": run_stream, "generate": run_generate}[args.child_part]
    try:
        result = fn(args.child_case, args.child_T, args)
    except (RuntimeError, MemoryError) as e:  # e.g. out of memory: report, don't stop the whole run
        result = {"part": args.child_part, "case": args.child_case, "T": args.child_T, "error": str(e)[:200]}
    result["load"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(result))
    return 0


def spawn(part: str, case: str, T: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child-part", part, "--child-case", case, "--child-T", str(T),
           "--threads", str(args.threads), "--dim", str(args.dim), "--layers", str(args.layers),
           "--heads", str(args.heads), "--piece", str(args.piece), "--gen-tokens", str(args.gen_tokens),
           "--steps", str(args.steps)]
    env = dict(os.environ)
    cpu_runtime_defaults(env, training=part == "train")  # what `titans-train fit` / `eval` set
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:  # killed (OOM) or crashed
        return {"part": part, "case": case, "T": T, "error": (out.stderr.strip().splitlines() or ["died"])[-1][:200],
                "load": os.getloadavg()[0]}
    return json.loads(lines[-1][len("RESULT "):])


def best_of(results: list[dict]) -> list[dict]:
    best: dict = {}
    for r in results:
        key = (r["part"], r["case"], r["T"])
        if "error" in r:
            best.setdefault(key, r)
        elif key not in best or "error" in best[key] or r["seconds"] < best[key]["seconds"]:
            best[key] = dict(r, peak_mib=max(r.get("peak_mib", 0), best.get(key, {}).get("peak_mib", 0)))
    return list(best.values())


def table(results: list[dict]) -> str:
    lines = []
    train = [r for r in results if r["part"] == "train"]
    if train:
        Ts = sorted({r["T"] for r in train})
        cases = [c for c in OURS + TITANS_PYTORCH if any(r["case"] == c for r in train)]
        get = {(r["case"], r["T"]): r for r in train}
        ref = {T: get.get(("transformer", T)) for T in Ts}
        lines.append("training step tokens/s (peak MiB; x Transformer++ full attention)")
        lines.append("| T | " + " | ".join(cases) + " |")
        lines.append("|---" * (len(cases) + 1) + "|")
        for T in Ts:
            cells = []
            for c in cases:
                r = get.get((c, T))
                if r is None:
                    cells.append("-")
                elif "error" in r:
                    cells.append("failed")
                else:
                    rel = ref[T]
                    ratio = f"; {r['tokens_per_s'] / rel['tokens_per_s']:.2f}x" if rel and "error" not in rel else ""
                    cells.append(f"{r['tokens_per_s']:,.0f} ({r['peak_mib']:,.0f}{ratio})")
            lines.append(f"| {T:,} | " + " | ".join(cells) + " |")
    for part, unit in (("stream", "tokens/s, peak RSS growth / max RSS MiB"), ("generate", "ms per token")):
        rows = [r for r in results if r["part"] == part]
        if rows:
            lines.append(f"\n{part} ({unit})")
            for r in sorted(rows, key=lambda r: (r["case"], r["T"])):
                if "error" in r:
                    lines.append(f"  {r['case']:12s} T={r['T']:>9,}  failed: {r['error']}")
                elif part == "stream":
                    lines.append(f"  {r['case']:12s} T={r['T']:>9,}  {r['tokens_per_s']:>9,.0f} tok/s  "
                                 f"{r['peak_mib']:>7,.0f} / {r['max_rss_mib']:>7,.0f} MiB  (load {r['load']:.1f})")
                else:
                    lines.append(f"  {r['case']:12s} prompt={r['T']:>7,}  {r['ms_per_token']:>8.1f} ms  (load {r['load']:.1f})")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in results if r["part"] == "train" and "error" not in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in OURS + TITANS_PYTORCH:
        rows = sorted((r for r in train if r["case"] == c), key=lambda r: r["T"])
        if rows:
            a.plot([r["T"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=c)
            b.plot([r["T"] for r in rows], [max(r["peak_mib"], 1) for r in rows], "o-", label=c)
    for ax, ylabel in ((a, "training tokens/s"), (b, "peak RSS growth (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle("forward + backward + AdamW, batch 1, float32, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["train", "stream", "generate"], choices=["train", "stream", "generate"])
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--variants", nargs="+", default=OURS + TITANS_PYTORCH, choices=OURS + TITANS_PYTORCH)
    p.add_argument("--tp-max-T", type=int, default=8192, help="largest T for titans-pytorch (its memory grows fast)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best of them")
    p.add_argument("--steps", type=int, default=2, help="training steps at T per measurement; the best counts")
    p.add_argument("--stream-tokens", type=int, default=2_097_152)
    p.add_argument("--stream-variants", nargs="+", default=["mag", "lmm"], choices=OURS)
    p.add_argument("--generate-variants", nargs="+", default=["mag", "lmm", "transformer"], choices=OURS)
    p.add_argument("--prompts", type=int, nargs="+", default=[512, 32768])
    p.add_argument("--gen-tokens", type=int, default=64, help="generated tokens timed after each prompt")
    p.add_argument("--piece", type=int, default=4096, help="tokens per call when streaming / feeding a prompt")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--out", default="model_throughput.json")
    p.add_argument("--png", default="model_throughput.png")
    p.add_argument("--child-part", help=argparse.SUPPRESS)
    p.add_argument("--child-case", help=argparse.SUPPRESS)
    p.add_argument("--child-T", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_part:
        return child(args)

    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load {os.getloadavg()}", flush=True)
    jobs = []
    if "train" in args.parts:
        jobs += [("train", c, T) for T in args.T for c in args.variants if c in OURS or T <= args.tp_max_T]
    results = []
    for rnd in range(args.rounds):
        for part, case, T in jobs:
            r = spawn(part, case, T, args)
            results.append(r)
            print(f"round {rnd} {json.dumps(r)}", flush=True)
    if "stream" in args.parts:
        for case in args.stream_variants:
            for total in (16384, args.stream_tokens):
                results.append(spawn("stream", case, total, args))
                print(json.dumps(results[-1]), flush=True)
    if "generate" in args.parts:
        for case in args.generate_variants:
            for prompt in args.prompts:
                results.append(spawn("generate", case, prompt, args))
                print(json.dumps(results[-1]), flush=True)
    best = best_of(results)
    print(table(best))
    with open(args.out, "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("child")}, "results": results,
                   "best": best}, f, indent=1)
    if any(r["part"] == "train" for r in best):
        plot(best, args.png)
    print(f"wrote {args.out}" + (f", {args.png}" if "train" in args.parts else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
