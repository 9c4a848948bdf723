"""`titans-train eval CKPT --task ppl|niah|lm-eval [options] [--out DIR]`: long-context evaluation of a checkpoint
(any format `fit` writes) or an export directory. Writes `<task>.json` (and a PNG plot) into --out (default:
`<checkpoint>.eval/` next to it), prints a short table, shows progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TASKS = ("ppl", "niah", "lm-eval")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from titans_train.eval.niah import HAYSTACKS, NEEDLES

    p.add_argument("ckpt", help="checkpoint (step-*.ckpt: a file, or a sharded / DeepSpeed directory) or a "
                                "directory written by `titans-train export`")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", help="directory for <task>.json and plots (default: <checkpoint>.eval next to it)")
    p.add_argument("--piece-len", type=int, default=1024, help="tokens per model call when streaming (bounds memory)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--data", help="prepared data directory (ppl; niah --haystack corpus); default: the recipe's data.path")
    p.add_argument("--split", default="validation", help="manifest split to read (ppl, corpus haystack)")
    g = p.add_argument_group("ppl")
    g.add_argument("--max-tokens", type=int, default=None, help="stop after this many target tokens")
    g.add_argument("--window", type=int, default=None,
                   help="isolated-window length to compare with (default: the recipe's n_chunks x chunk_len)")
    g = p.add_argument_group("niah")
    g.add_argument("--lengths", type=_ints, default=[4096, 16384, 65536], help="prompt lengths in tokens, comma-separated")
    g.add_argument("--depths", type=_floats, default=[0, 0.25, 0.5, 0.75, 1], help="needle depths in [0, 1]")
    g.add_argument("--samples", type=int, default=5, help="samples per (length, depth)")
    g.add_argument("--needle", choices=NEEDLES, default="passkey")
    g.add_argument("--digits", type=int, default=None, help="digits of a passkey / number value (default 5 / 7)")
    g.add_argument("--haystack", choices=HAYSTACKS, default="noise")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("lm-eval")
    g.add_argument("--tasks", default="", help="lm-eval task names, comma-separated")
    g.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAMLs")
    g.add_argument("--limit", type=float, default=None, help="samples per task (or a fraction)")
    g.add_argument("--num-fewshot", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    from titans_train.cli import UserError
    from titans_train.eval.load import load_model

    if args.piece_len < 1:
        raise UserError(f"--piece-len {args.piece_len} must be >= 1")
    recipe, model, tok = load_model(args.ckpt)
    try:
        model.to(args.device)
    except Exception as e:
        raise UserError(f"--device {args.device}: {e}") from None
    ckpt = Path(args.ckpt).resolve()
    out = Path(args.out) if args.out else ckpt.with_name(ckpt.name + ".eval")
    try:
        result, plot = {"ppl": _ppl, "niah": _niah, "lm-eval": _lm_eval}[args.task](args, recipe, model, tok, out)
    except (ValueError, KeyError) as e:  # bad sizes, lengths below the prompt, unknown lm-eval tasks
        raise UserError(str(e).strip("'\"")) from None
    result = {"checkpoint": str(args.ckpt), "variant": recipe.model.variant, **result}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.task}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    if plot is not None:
        drawn = plot(result, out / f"{args.task}.png")
        print(f"plot: {drawn}" if drawn else "plot: skipped (pip install -e '.[eval]' for matplotlib)")
    print(f"results: {path}")
    return 0


def _need_tok(tok, args):
    from titans_train.eval.load import require_tokenizer

    require_tokenizer(tok, args.ckpt)
    return tok


def _data(args, recipe, tok) -> str:
    from titans_train.cli import UserError
    from titans_train.data.shards import Manifest
    from titans_train.eval.load import check_data_tokenizer

    path = args.data or recipe.data.path
    Manifest(path).shards(args.split)  # a missing manifest or split is a one-line DataError
    check_data_tokenizer(tok, path, args.ckpt)
    if Manifest(path).tokenizer["vocab_size"] > recipe.model.vocab_size:
        raise UserError(f"--data {path} has a larger vocabulary than the model's {recipe.model.vocab_size}")
    return path


def _progress(total: int, what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), transient=True)
    task = bar.add_task(what, total=total)
    return bar, lambda n: bar.advance(task, n)


def _ppl(args, recipe, model, tok, out):
    from titans_train.data.shards import Manifest
    from titans_train.eval.plots import plot_ppl
    from titans_train.eval.ppl import documents, evaluate_ppl

    path = _data(args, recipe, _need_tok(tok, args))
    window = args.window or recipe.data.n_chunks * recipe.data.chunk_len
    if window < 1 or (args.max_tokens is not None and args.max_tokens < 1):
        raise ValueError(f"--window {window} and --max-tokens {args.max_tokens} must be >= 1")
    total = sum(s.tokens for s in Manifest(path).shards(args.split))
    bar, advance = _progress(min(total, args.max_tokens or total), "ppl tokens")
    with bar:
        r = evaluate_ppl(model, documents(path, args.split, args.max_tokens), window, args.piece_len, advance)
    if not r["tokens"]:
        raise ValueError(f"--data {path}: split {args.split!r} has no documents to score")
    print(f"{'positions':>14} {'tokens':>9} {'streamed':>9} {'windowed':>9}")
    for b in r["buckets"]:
        if b["tokens"]:
            print(f"{b['start']:>6}-{b['end']:<7} {b['tokens']:>9} {b['loss_streamed']:>9.4f} {b['loss_windowed']:>9.4f}")
    print(f"{'all':>14} {r['tokens']:>9} {r['loss_streamed']:>9.4f} {r['loss_windowed']:>9.4f}  "
          f"(ppl {r['ppl_streamed']:.2f} vs {r['ppl_windowed']:.2f}, window {window})")
    return {**r, "data": path, "split": args.split}, plot_ppl


def _niah(args, recipe, model, tok, out):
    from titans_train.eval.niah import (KEYS, CorpusHaystack, evaluate_niah, make_needle, make_needle_with_key,
                                        make_sample, noise_haystack)
    from titans_train.eval.plots import plot_niah
    from titans_train.train.callbacks.memory import peak_rss_gib

    tok = _need_tok(tok, args)
    if args.samples < 1 or not args.lengths or not args.depths:
        raise ValueError("--samples must be >= 1 and --lengths, --depths non-empty")
    if args.digits is not None and args.digits < 1:
        raise ValueError(f"--digits {args.digits} must be >= 1")
    if args.haystack == "corpus":
        haystack = CorpusHaystack(_data(args, recipe, tok), args.split, tok.eos_id)
    else:
        haystack = noise_haystack(tok)
    probe = make_needle(args.needle, tok, random.Random(0), args.digits)
    longest = max(KEYS, key=lambda k: len(tok.encode(k))) if args.needle != "passkey" else probe.key
    probe = make_needle_with_key(probe, longest, tok)
    for length in args.lengths:  # every error before the first sample (the longest key makes the longest prompt)
        make_sample(length, 0.0, probe, haystack)
    bar, advance = _progress(sum(args.lengths) * len(args.depths) * args.samples, "niah tokens")
    with bar:
        r = evaluate_niah(model, tok, args.lengths, args.depths, args.samples, args.needle, haystack, seed=args.seed,
                          digits=args.digits, piece_len=args.piece_len, progress=advance)
    r["peak_rss_bytes"] = int(peak_rss_gib() * 2**30)
    print("depth \\ length " + " ".join(f"{n:>9}" for n in args.lengths))
    for d in args.depths:
        print(f"{d:>15g} " + " ".join(f"{r['accuracy'][str(n)][str(d)]:>9.2f}" for n in args.lengths))
    print(f"mean accuracy {r['mean_accuracy']:.3f} (chance {r['chance']:.3g}); {r['tokens_per_s']:.0f} tokens/s; "
          f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    return {**r, "haystack": args.haystack}, plot_niah


def _lm_eval(args, recipe, model, tok, out):
    from titans_train.eval.lm_eval_adapter import run_lm_eval

    tok = _need_tok(tok, args)
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise ValueError("--task lm-eval needs --tasks NAME[,NAME...]")
    r = run_lm_eval(model, tok, tasks, include_path=args.include_path, limit=args.limit,
                    num_fewshot=args.num_fewshot, piece_len=args.piece_len)
    for name, metrics in r["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{name}: {shown}")
    return {"task": "lm-eval", **r}, None
