"""Quality at equal size and tokens: LMM, MAC, MAG, MAL vs Transformer++ (full and sliding window) and two peers.

Every model is trained on the same batches (byte tokens of the built-in corpus's train split, windows of 512
sampled with the run's seed), with the same schedule (AdamW, linear warm-up then cosine, clipping, weight decay on
matrices only) and the same seed, at a matched parameter count (`--params`, 3.3M by default: each model's MLP width
is solved for it, within 5%). Our models restart their memory at document starts (the token after an end token),
as `titans-train fit` does by default (train.reset_memory=token), in training and in both evaluations.
Then, on held-out text (the validation split):

- windowed: bits per byte on fixed 512-token windows, each from a fresh state, and by position in the window;
- streamed: the same targets fed through the model's state in 512-token pieces over the whole held-out stretch
  (`--eval-tokens`, 65,536 by default), by position in the stream (doubling buckets). Models whose state is bounded
  (the memory variants, sliding-window attention) only; full attention would need a KV cache of the stream.

Peers (the `bench` extra): `titans_pytorch.MemoryAsContextTransformer` (its defaults, our width/depth/segment) and
an x-transformers Transformer++ decoder (RMSNorm, SwiGLU, RoPE, no biases). Both are trained by the same loop.

Prints a table, writes `quality.json` (per-step loss and gradient norm, evaluations, tokens/s) and `quality.png`
(training loss, gradient norm and bits/byte by position) under `--out`.

    python benchmarks/quality.py                          # one seed, our 6 models + 2 peers, 256 steps (~1M tokens)
    python benchmarks/quality.py --seeds 3 --models lmm mag transformer
    python benchmarks/quality.py --steps 500 --eval-tokens 0    # training curves and gradient norms only
    python benchmarks/quality.py --models mag --first-seed 1 --seeds 2 --out A   # a share of the work per process,
    python benchmarks/quality.py --merge A B C --out results     # then one table

Bits per byte: the byte tokenizer has one token per byte plus an end-of-document token, so nats/token / ln 2 is
bits/byte up to the share of end tokens (< 0.01%).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from titans_train.cli import flush_denormals  # noqa: E402
from titans_train.config import load_recipe, model_config  # noqa: E402
from titans_train.models import build_model  # noqa: E402
from titans_train.train.optim import WarmupCosine, param_groups  # noqa: E402

OURS = {  # name -> recipes/mini_<name>.yaml
    "transformer": "mini_transformer", "transformer_swa": "mini_transformer_swa", "lmm": "mini_lmm",
    "mac": "mini_mac", "mag": "mini_mag", "mal": "mini_mal",
}
PEERS = ("titans_pytorch_mac", "x_transformers", "x_transformers_ourinit")
ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2)


# ---- data -------------------------------------------------------------------------------------------------------

def eos_id(man) -> int:
    """The end-of-document token of a prepared dataset's manifest."""
    return man.tokenizer.get("eos_id", man.tokenizer["vocab_size"] - 1)


def split_tokens(man, split: str) -> np.ndarray:
    """All documents of a split, in manifest order, joined by the end-of-document token (uint16)."""
    from titans_train.data.shards import iter_shard

    eos = eos_id(man)
    docs = []
    for shard in man.shards(split):
        for doc in iter_shard(shard):
            docs += [doc, np.array([eos], dtype=doc.dtype)]
    return np.concatenate(docs)


def train_batches(tokens: np.ndarray, steps: int, batch: int, seq: int, seed: int, stream: int) -> np.ndarray:
    """(steps, batch, seq + 1) windows, the same for every model of a seed: every `stream` steps each row jumps to
    a random offset of the corpus, and in between window i + 1 continues window i (a training window of `stream`
    sequence chunks, as `titans-train fit` with data.n_chunks = stream reads it)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - stream * seq - 1, size=(-(-steps // stream), batch))
    starts = np.repeat(starts, stream, axis=0)[:steps] + seq * (np.arange(steps) % stream)[:, None]
    return tokens[starts[..., None] + np.arange(seq + 1)]


def doc_starts(inputs: torch.Tensor, eos: int, prev: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: True where a document starts (the token after an end-of-document token). prev (B,): the token
    before each row (a stream's previous piece); without it the row's first token starts fresh anyway."""
    reset = torch.zeros_like(inputs, dtype=torch.bool)
    reset[:, 1:] = inputs[:, :-1] == eos
    if prev is not None:
        reset[:, 0] = prev == eos
    return reset


# ---- models -----------------------------------------------------------------------------------------------------

def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _solve(build, target: int, lo: float, hi: float, integer: bool):
    """The MLP size in [lo, hi] whose model's parameter count is closest to `target` (bisection, monotone)."""
    for _ in range(40):
        mid = (lo + hi) / 2
        mid = round(mid) if integer else mid
        n = _count(build(mid, "meta"))
        if n < target:
            lo = mid
        else:
            hi = mid
        if (integer and hi - lo <= 1) or (not integer and hi - lo < 1e-3):
            break
    best = min((lo, hi), key=lambda m: abs(_count(build(m, "meta")) - target))
    return best


def our_builder(name: str, overrides: list[str]):
    recipe = ROOT / "recipes" / f"{OURS[name]}.yaml"

    def build(mlp_hidden, device="cpu"):
        cfg = load_recipe(recipe, [*overrides, f"model.mlp_hidden={int(mlp_hidden)}"])
        with torch.device(device):
            return build_model(cfg["model"])

    return build


def peer_builder(name: str, base):
    """A peer at our mini recipes' width, depth, heads and (MAC) segment/persistent tokens."""
    m = model_config(base)

    if name.startswith("x_transformers"):
        from x_transformers import Decoder, TransformerWrapper

        def build(ff_mult, device="cpu"):
            with torch.device(device):
                model = TransformerWrapper(
                    num_tokens=m.vocab_size, max_seq_len=m.max_seq_len, use_abs_pos_emb=False,
                    attn_layers=Decoder(dim=m.dim, depth=m.n_layers, heads=m.heads, rotary_pos_emb=True, ff_glu=True,
                                        ff_mult=ff_mult, use_rmsnorm=True, ff_no_bias=True, attn_flash=True))
            if name == "x_transformers_ourinit" and device != "meta":
                our_init_(model, m.n_layers)
            return model
    else:
        from titans_pytorch import MemoryAsContextTransformer

        def build(ff_mult, device="cpu"):
            with torch.device(device):
                return MemoryAsContextTransformer(
                    num_tokens=m.vocab_size, dim=m.dim, depth=m.n_layers, heads=m.heads, dim_head=m.dim // m.heads,
                    segment_len=m.segment_len, num_persist_mem_tokens=m.n_persistent,
                    num_longterm_mem_tokens=m.mac_memory_tokens // 4, ff_mult=ff_mult,
                    neural_memory_kwargs=dict(heads=m.heads, dim_head=m.dim // m.heads))

    return build


@torch.no_grad()
def our_init_(model: nn.Module, n_layers: int) -> None:
    """x-transformers' decoder with our models' init (`init_std: null`, TransformerLM.reset_parameters): linear maps
    normal 1/sqrt(fan_in), biases 0, the residual branches' output maps (attention `to_out`, the feed-forward's last
    linear) that / sqrt(2 n_layers), token embedding std 1. Isolates the init from the rest of the two stacks."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            output = name.endswith("to_out") or name.endswith("ff.2")
            std = module.in_features ** -0.5 / (math.sqrt(2 * n_layers) if output else 1.0)
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)


class Runner:
    """One model behind a common interface: logits of a batch, and streaming where the model has a state."""

    def __init__(self, name: str, model: nn.Module):
        self.name, self.model = name, model
        self.ours = name in OURS
        self.streams = self.ours and not (name == "transformer")

    def logits(self, x: torch.Tensor, state=None, reset: torch.Tensor | None = None):
        """reset (B, T) bool: document starts, where our models restart their memory (train.reset_memory=token,
        the framework's default; attention is not reset). Peers read straight through."""
        if self.ours:
            return self.model(x, state, reset if reset is not None and bool(reset.any()) else None)
        if self.name == "titans_pytorch_mac":
            return self.model(x), None
        return self.model(x), None


def make_runner(name: str, params: int, seed: int, overrides: list[str]) -> tuple[Runner, dict]:
    if name in OURS:
        build = our_builder(name, overrides)
        size = _solve(build, params, 8, 4096, integer=True)
    else:
        base = load_recipe(ROOT / "recipes" / "mini_transformer.yaml", overrides)
        build = peer_builder(name, base)
        size = _solve(build, params, 0.05, 8.0, integer=False)
    torch.manual_seed(seed)
    model = build(size)
    return Runner(name, model), {"mlp_size": size, "params": _count(model)}


# ---- training and evaluation ------------------------------------------------------------------------------------

def train(runner: Runner, batches: np.ndarray, lr: float, warmup: int, clip: float, wd: float, stream: int,
          eos: int) -> dict:
    """AdamW on the batches. Models with a bounded state carry it, detached, from each window into the next within
    a stream of `stream` windows and start each stream fresh, as `titans-train fit` carries it across the sequence
    chunks of a training window with truncated backprop every chunk; the others start every window from scratch."""
    model = runner.model
    model.train()
    for param in model.parameters():  # a peer initialises some parameters as expanded views: give them storage
        if 0 in param.stride():
            param.data = param.data.clone()
    opt = torch.optim.AdamW(param_groups(model, wd), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup, len(batches), 0.1))
    losses, norms, times = [], [], []
    state = None
    for step, b in enumerate(batches):
        x = torch.from_numpy(b.astype(np.int64))
        t0 = time.perf_counter()
        carry = runner.streams and step % stream != 0
        prev = torch.from_numpy(batches[step - 1, :, -2].astype(np.int64)) if carry else None
        logits, state = runner.logits(x[:, :-1], state if carry else None, doc_starts(x[:, :-1], eos, prev))
        state = state.detach() if runner.streams else None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if torch.isfinite(norm):
            opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        norms.append(norm.item())
        if step % 32 == 0 or step == len(batches) - 1:
            print(f"  {runner.name} step {step:4d} loss {loss.item():.3f} grad norm {norm.item():.3g} "
                  f"{x[:, 1:].numel() / times[-1]:,.0f} tok/s", flush=True)
    tokens = batches.shape[1] * (batches.shape[2] - 1)
    steady = times[1:] or times
    return {"loss": losses, "grad_norm": norms, "tokens_per_s": tokens * len(steady) / sum(steady),
            "train_tokens": tokens * len(batches)}


def buckets(n: int, first: int = 512) -> list[tuple[int, int]]:
    """[0, first), [first, 2 first), [2 first, 4 first), ... up to n."""
    out, lo, hi = [], 0, first
    while lo < n:
        out.append((lo, min(hi, n)))
        lo, hi = hi, hi * 2
    return out


@torch.no_grad()
def evaluate(runner: Runner, tokens: np.ndarray, seq: int, n_eval: int, eos: int) -> dict:
    """Windowed and (where the model has a bounded state) streamed bits/byte on the same targets."""
    model = runner.model
    model.eval()
    n = n_eval // seq * seq
    x = torch.from_numpy(tokens[: n + 1].astype(np.int64))
    inp, tgt = x[:-1].view(-1, seq), x[1:].view(-1, seq)
    nll = []
    for i in range(0, len(inp), 16):
        logits, _ = runner.logits(inp[i:i + 16], None, doc_starts(inp[i:i + 16], eos))
        nll.append(F.cross_entropy(logits.float().transpose(1, 2), tgt[i:i + 16], reduction="none"))
    win = torch.cat(nll)  # (windows, seq) nats
    out = {"windowed_bpb": win.mean().item() / LN2,
           "windowed_by_position": {f"{a}-{b}": win[:, a:b].mean().item() / LN2 for a, b in buckets(seq, 64)}}
    if runner.streams:
        state, parts = None, []
        for i in range(len(inp)):
            prev = inp[i - 1, -1:] if i else None
            logits, state = runner.logits(inp[i:i + 1], state, doc_starts(inp[i:i + 1], eos, prev))
            parts.append(F.cross_entropy(logits.float()[0], tgt[i], reduction="none"))
        st = torch.cat(parts)  # (n,) nats, stream order
        flat_win = win.reshape(-1)
        out["streamed_bpb"] = st.mean().item() / LN2
        out["streamed_by_position"] = {f"{a}-{b}": st[a:b].mean().item() / LN2 for a, b in buckets(n)}
        out["windowed_by_stream_position"] = {f"{a}-{b}": flat_win[a:b].mean().item() / LN2 for a, b in buckets(n)}
    return out


# ---- report -----------------------------------------------------------------------------------------------------

def table(results: dict, seeds: list[int]) -> str:
    rows = ["| model | seeds | params | bits/byte windowed | bits/byte streamed | final train loss (nats, mean of last "
            "16) | max grad norm / Transformer++'s | train tokens/s |", "|---|---|---|---|---|---|---|---|"]
    ref_norms = {s: results[str(s)]["transformer"]["train"]["grad_norm"] for s in seeds
                 if "transformer" in results[str(s)]}
    names = list(results[str(seeds[0])])
    for name in names:
        runs = [results[str(s)][name] for s in seeds if name in results[str(s)]]

        def mean(f):
            vals = [f(r) for r in runs]
            vals = [v for v in vals if v is not None]
            if not vals:
                return "-"
            m = sum(vals) / len(vals)
            sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
            return f"{m:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

        ratio = "-"
        if ref_norms:
            rs = [max(a / b for a, b in zip(r["train"]["grad_norm"], ref_norms[s]))
                  for s, r in zip(seeds, runs) if s in ref_norms]
            ratio = f"{max(rs):.2f}x" if rs else "-"
        rows.append(f"| {name} | {len(runs)} | {runs[0]['params']:,} | {mean(lambda r: r['eval'].get('windowed_bpb'))} | "
                    f"{mean(lambda r: r['eval'].get('streamed_bpb'))} | "
                    f"{mean(lambda r: float(np.mean(r['train']['loss'][-16:])))} | {ratio} | "
                    f"{sum(r['train']['tokens_per_s'] for r in runs) / len(runs):,.0f} |")
    return "\n".join(rows)


def plot(results: dict, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(24, 5))
    first = results[str(seeds[0])]
    ref = {s: results[str(s)]["transformer"]["train"]["grad_norm"] for s in seeds if "transformer" in results[str(s)]}
    for name in first:
        runs = [results[str(s)][name] for s in seeds if name in results[str(s)]]
        loss = np.mean([r["train"]["loss"] for r in runs], axis=0)
        smooth = np.convolve(loss, np.ones(8) / 8, mode="valid")
        line, = axes[0].plot(np.arange(len(smooth)) + 8, smooth, label=name)
        axes[1].plot(np.max([r["train"]["grad_norm"] for r in runs], axis=0), color=line.get_color(), label=name)
        ratios = [np.asarray(r["train"]["grad_norm"]) / np.asarray(ref[s]) for s, r in zip(seeds, runs) if s in ref]
        if ratios and name != "transformer":  # per step, worst seed: the 10x bound
            axes[3].plot(np.max(ratios, axis=0), color=line.get_color(), label=name)
        ev = runs[0]["eval"]
        for key, style in (("streamed_by_position", "-"), ("windowed_by_stream_position", ":")):
            if key in ev:
                lab = [k for k in ev[key]]
                ys = np.mean([[r["eval"][key][k] for k in lab] for r in runs], axis=0)
                xs = [int(k.split("-")[1]) for k in lab]
                axes[2].plot(xs, ys, style, color=line.get_color(),
                             label=f"{name} {'streamed' if style == '-' else 'windowed'}")
    axes[0].set(title="training loss (nats/byte, 8-step mean)", xlabel="step", ylim=(None, 3.5))
    axes[1].set(title="global gradient norm before clipping (max over seeds)", xlabel="step", yscale="log")
    axes[2].set(title="held-out bits/byte by stream position", xlabel="tokens (bucket end)", xscale="log")
    axes[3].axhline(10.0, color="red", linestyle="--", linewidth=1, label="10x")
    axes[3].set(title="gradient norm / Transformer++'s at the same step (max over seeds)", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[*OURS, "x_transformers"],
                   help=f"of {', '.join([*OURS, *PEERS])} (default: all but titans_pytorch_mac, ~8x slower here)")
    p.add_argument("--seeds", type=int, default=1, help="how many seeds (each: init and batches)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first..first+N-1: split one table's seeds or models over processes, then --merge")
    p.add_argument("--steps", type=int, default=256, help="training steps (256 x 8 x 512 = 1.05M tokens)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--params", type=int, default=3_300_000, help="parameter count every model is matched to")
    p.add_argument("--stream", type=int, default=1,
                   help="training windows per stream: each batch row reads this many consecutive windows, and models "
                        "with a bounded state carry it across them (8: 4K-token streams). Default 1: independent "
                        "windows; 8 cost Transformer++ 0.28 bits/byte at 256 steps (fewer distinct stretches of text)")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="held-out tokens (windowed and streamed); 0: none")
    p.add_argument("--data", default=str(ROOT / "data" / "builtin"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--save", action="store_true", help="also write each trained model's state_dict to --out")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="no training: merge the quality.json of these --out directories (their seeds and models; "
                        "DIR=LABEL renames a directory's model) into one table, JSON and PNG under --out")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for our models (e.g. model.memory.inner_step=plain)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flush_denormals()  # a carried state decays through the subnormal range (titans_train.cli.flush_denormals)
    if args.merge:
        return merge(args.merge, Path(args.out))
    data = Path(args.data)
    if not (data / "manifest.json").exists():
        sys.exit(f"{data} holds no prepared data: run `titans-train prepare builtin --out {data}` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from titans_train.data.shards import Manifest

    man = Manifest(data)
    train_tokens, val_tokens = split_tokens(man, "train"), split_tokens(man, "validation")
    eos = eos_id(man)
    print(f"train {len(train_tokens):,} tokens, held-out {len(val_tokens):,}; load {os.getloadavg()}; "
          f"threads {torch.get_num_threads()}", flush=True)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results: dict = {"config": vars(args), "load_start": os.getloadavg()}
    for seed in seeds:
        batches = train_batches(train_tokens, args.steps, args.batch, args.seq, seed, args.stream)
        results[str(seed)] = {}
        for name in args.models:
            runner, info = make_runner(name, args.params, seed, args.set)
            print(f"seed {seed} {name}: {info['params']:,} parameters (MLP size {info['mlp_size']:.4g}); "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
            rec = {**info, "train": train(runner, batches, args.lr, args.warmup, args.clip, args.weight_decay,
                                         args.stream, eos)}
            rec["eval"] = evaluate(runner, val_tokens, args.seq, args.eval_tokens, eos) if args.eval_tokens else {}
            print(f"  {name}: {json.dumps(rec['eval'])[:300]}", flush=True)
            results[str(seed)][name] = rec
            if args.save:
                torch.save(runner.model.state_dict(), out / f"{name}_seed{seed}.pt")
            (out / "quality.json").write_text(json.dumps(results))
    results["load_end"] = os.getloadavg()
    (out / "quality.json").write_text(json.dumps(results))
    results_by_seed = {k: v for k, v in results.items() if k.isdigit()}
    print(table(results_by_seed, seeds))
    plot(results_by_seed, seeds, out / "quality.png")
    print(f"wrote {out / 'quality.json'} and {out / 'quality.png'}; load at end {os.getloadavg()}")


def merge(dirs: list[str], out: Path) -> None:
    """One table from runs split over processes: seed -> model -> record, later directories filling in."""
    results: dict = {}
    for d in dirs:
        d, _, label = d.partition("=")  # DIR=LABEL: its models under LABEL (a run with --set, beside the default)
        part = json.loads((Path(d) / "quality.json").read_text())
        for seed, runs in part.items():
            if seed.isdigit():
                results.setdefault(seed, {}).update({label or name: rec for name, rec in runs.items()})
    seeds = sorted(int(s) for s in results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"merged_from": dirs, **results}))
    print(table(results, seeds))
    plot(results, seeds, out / "quality.png")
    print(f"wrote {out / 'quality.json'} and {out / 'quality.png'}")


if __name__ == "__main__":
    main()
