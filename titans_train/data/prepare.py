"""`titans-train prepare SOURCE... --out DIR`: raw text -> webdataset token shards + manifest.json.

    titans-train prepare builtin --out data/builtin                 # Python stdlib + docs, no download
    titans-train prepare 'corpus/*.jsonl.gz' --out data/mine --tokenizer llama2/tokenizer.json
    titans-train prepare hf:HuggingFaceFW/fineweb-edu --hf-config sample-10BT --limit 1000000 --out data/fwe

Documents are read and tokenized in `--workers` processes (units: batches of files, files, parquet row groups),
results come back in input order and are written by this process, so the output does not depend on timing:
preparing twice gives byte-identical shards. Re-running the same command is a no-op once the manifest is
written; an interrupted run leaves no manifest, and the next run starts over.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections import deque
from pathlib import Path

from titans_train.cli import UserError

SPLITS = ("train", "validation")
_OURS = re.compile(r"^(train|validation)-\d{5}\.tar(\.tmp)?$|^(manifest|tokenizer)\.json\.tmp$")


def parse_size(text: str) -> int:
    """'4MiB', '64MB', '1G', '500000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 4MiB, 64MB, 1G")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return max(1, int(float(m.group(1)) * scale))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="`builtin`, a local .txt/.jsonl/.jsonl.gz/.parquet file or glob, hf:NAME_OR_PATH, or "
                   "passkey[:docs=N,digits=D,min_len=A,max_len=B] (synthetic needle-in-a-haystack documents)")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--tokenizer", default="byte", help="`byte` (default) or a Hugging Face tokenizer.json path")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                   help="train a byte-level BPE of this vocabulary on the train split (saved as OUT/tokenizer.json)")
    p.add_argument("--eos-token", help="the tokenizer's end-of-text token (default: found by name)")
    p.add_argument("--text-field", default="text", help="field/column holding the text (jsonl, parquet, hf)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents (by a hash of their id) in the validation split (default 0.01)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("4MiB"),
                   help="target shard size (default 4MiB: the built-in corpus gives 16 train shards, enough "
                   "streams for 8 GPUs x 2 workers; use 64MiB-1GiB for large corpora on object storage)")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"),
                   help="token storage (auto: uint16 when the vocabulary fits)")
    p.add_argument("--workers", type=int, default=2, help="processes reading and tokenizing (default 2)")
    p.add_argument("--limit", type=int, help="only the first N documents of each source (smoke tests)")
    p.add_argument("--hf-split", default="train", help="split of an hf: dataset (default train)")
    p.add_argument("--hf-config", help="configuration of an hf: dataset (e.g. sample-10BT)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset prepared by a different command")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces this dataset (recorded in the manifest)."""
    parts = ["titans-train", "prepare", *args.sources, "--out", str(args.out), "--tokenizer", args.tokenizer]
    for flag in ("train_tokenizer", "eos_token", "limit", "hf_config"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    parts += ["--text-field", args.text_field, "--val-fraction", repr(args.val_fraction),
              "--shard-size", str(args.shard_size), "--dtype", args.dtype]
    if any(s.startswith("hf:") for s in args.sources):
        parts += ["--hf-split", args.hf_split]
    return shlex.join(parts)


# --- worker side -------------------------------------------------------------------------------------------------

_W: dict = {}


def _init_worker(tokenizer_spec: str, eos_token: str | None, dtype: str, text_field: str):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # processes give the parallelism
    from titans_train.data.tokenizer import load_tokenizer

    _W.update(tok=load_tokenizer(tokenizer_spec, eos_token), dtype=dtype, text_field=text_field)


def _work(job: tuple) -> tuple[list, int]:
    """Read and tokenize one unit: ([(doc_id, tokens)], documents skipped). Runs in a worker process."""
    from titans_train.data.corpus import read_unit

    unit, val_fraction = job
    docs, skipped = [], 0
    ids, texts = [], []
    for doc_id, text in read_unit(unit, _W["text_field"]):
        if not text:  # None (not UTF-8 / null) or empty
            skipped += 1
            continue
        ids.append(doc_id)
        texts.append(text)
    tok = _W["tok"]
    encoded = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    for doc_id, ids_ in zip(ids, encoded):
        docs.append((doc_id, ids_.astype(_W["dtype"])))
    return docs, skipped


def _ordered_map(pool, jobs, inflight: int):
    """pool.apply_async over `jobs` with at most `inflight` pending; results in job order (bounded memory, unlike
    Pool.imap, whose feeder thread drains a streaming source)."""
    if pool is None:
        for job in jobs:
            yield _work(job)
        return
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(_work, (job,)))
        if len(pending) >= inflight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# --- main side ---------------------------------------------------------------------------------------------------


def _source_units(spec: str, args) -> tuple[str, object, int | None]:
    """(source, units, number of units if known). Local globs are expanded here, before anything is written."""
    from titans_train.data import corpus

    if spec == "builtin":
        units = corpus.builtin_units(args.limit)
        return spec, units, len(units)
    if spec == "passkey" or spec.startswith("passkey:"):
        units = corpus.passkey_units(spec, args.limit)
        return spec, units, len(units)
    if spec.startswith("hf:"):
        return spec, corpus.hf_units(spec, args.text_field, args.hf_split, args.hf_config, args.limit), None
    units = corpus.local_units(spec)
    return spec, units, len(units)


def _existing_state(out: Path, request: dict) -> str:
    """'fresh', 'up-to-date' or 'different' for the manifest already in `out` (if any)."""
    import json

    from titans_train.data.shards import MANIFEST

    path = out / MANIFEST
    if not path.exists():
        return "fresh"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "different"
    if data.get("request") != request:
        return "different"
    for split in data.get("splits", {}).values():
        for s in split["shards"]:
            p = out / s["path"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                return "different"
    tok_path = data.get("tokenizer", {}).get("path")
    if request.get("train_tokenizer") and not (out / str(tok_path)).is_file():
        return "different"
    return "up-to-date"


def _clean(out: Path):
    """Remove shards, temp files and a manifest this tool wrote before (only names it uses)."""
    (out / "manifest.json").unlink(missing_ok=True)  # first: never a manifest over half-replaced shards
    for p in out.iterdir():
        if _OURS.match(p.name):
            p.unlink()


def _summary(manifest: dict) -> str:
    lines = []
    for split in SPLITS:
        s = manifest["splits"].get(split)
        if s:
            lines.append(f"{split}: {s['docs']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} shards")
    sk = manifest["skipped_documents"]
    if sk:
        lines.append(f"skipped {sk:,} empty or non-UTF-8 documents")
    tok = manifest["tokenizer"]
    lines.append(f"tokenizer {tok['kind']} (vocab {tok['vocab_size']}, eos {tok['eos_id']}), {manifest['dtype']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import multiprocessing as mp

    from titans_train.data.corpus import read_unit, split_of
    from titans_train.data.shards import FORMAT, MANIFEST, VERSION, SplitWriter, write_json_atomic
    from titans_train.data.tokenizer import load_tokenizer, storage_dtype, tokenizer_record, train_bpe

    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers} must be >= 0")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit} must be >= 1")
    if args.train_tokenizer is not None and args.tokenizer != "byte":
        raise UserError("give either --tokenizer PATH or --train-tokenizer VOCAB, not both")
    out = Path(args.out)
    sources = [_source_units(s, args) for s in args.sources]  # errors on empty globs before writing anything

    request = {
        "sources": list(args.sources),
        "text_field": args.text_field,
        "val_fraction": args.val_fraction,
        "shard_size": args.shard_size,
        "dtype": args.dtype,
        "limit": args.limit,
        "eos_token": args.eos_token,
        "train_tokenizer": args.train_tokenizer,
        "hf": [args.hf_split, args.hf_config] if any(s.startswith("hf:") for s in args.sources) else None,
    }
    if args.train_tokenizer is None:
        tok = load_tokenizer(args.tokenizer, args.eos_token)
        request["tokenizer"] = tokenizer_record(tok)
        storage_dtype(tok.vocab_size, args.dtype)  # fail early: uint16 with a larger vocabulary
    else:
        storage_dtype(args.train_tokenizer, args.dtype)

    out.mkdir(parents=True, exist_ok=True)
    state = _existing_state(out, request)
    if state == "up-to-date":
        import json

        print(f"{out / MANIFEST} is up to date (same command); nothing to do")
        print(_summary(json.loads((out / MANIFEST).read_text())))
        return 0
    if state == "different" and not args.overwrite:
        raise UserError(
            f"{out} holds a dataset prepared by a different command: pass --overwrite to replace it, or choose another --out"
        )
    _clean(out)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[docs]:,} docs {task.fields[tokens]:,} tokens"),
        disable=args.no_progress, transient=False, console=None,
    )

    tok_path_in_manifest = None
    if args.train_tokenizer is not None:
        # Train on the train split only, so validation text stays unseen.
        def texts():
            for src, units, _ in sources:
                n = 0  # counted like the writing loop below: non-empty documents
                for unit in units:
                    for doc_id, text in read_unit(unit, args.text_field):
                        if not text:
                            continue
                        if args.limit is not None and n >= args.limit:
                            break
                        n += 1
                        if split_of(doc_id, args.val_fraction) == "train":
                            yield text

        print(f"training a byte-level BPE tokenizer (vocab {args.train_tokenizer}) on the train split", file=sys.stderr)
        tok = train_bpe(texts(), args.train_tokenizer, out / "tokenizer.json")
        sources = [_source_units(s, args) for s in args.sources]  # hf: units are single-use generators
        tok_path_in_manifest = "tokenizer.json"
        tok_spec = str(out / "tokenizer.json")
    else:
        tok_spec = args.tokenizer
    dtype = storage_dtype(tok.vocab_size, args.dtype)

    writers = {s: SplitWriter(out, s, args.shard_size, dtype) for s in SPLITS}
    skipped = 0
    pool = None
    try:
        if args.workers > 1:
            pool = mp.get_context().Pool(args.workers, _init_worker, (tok_spec, args.eos_token, dtype.name, args.text_field))
        else:
            _init_worker(tok_spec, args.eos_token, dtype.name, args.text_field)
        with progress:
            for src, units, n_units in sources:
                task = progress.add_task(src, total=n_units, docs=0, tokens=0)
                n_docs = n_tokens = 0
                jobs = ((u, args.val_fraction) for u in units)
                for docs, n_skipped in _ordered_map(pool, jobs, inflight=4 * max(args.workers, 1)):
                    skipped += n_skipped
                    for doc_id, tokens in docs:
                        if args.limit is not None and n_docs >= args.limit:
                            break
                        writers[split_of(doc_id, args.val_fraction)].add(tokens)
                        n_docs += 1
                        n_tokens += int(tokens.size)
                    progress.update(task, advance=1, docs=n_docs, tokens=n_tokens)
                    if args.limit is not None and n_docs >= args.limit:
                        break
        splits = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "command": command_line(args),
        "request": request,
        "sources": list(args.sources),
        "tokenizer": tokenizer_record(tok, tok_path_in_manifest),
        "dtype": dtype.name,
        "splits": {s: v for s, v in splits.items() if v["docs"] or s == "train"},
        "skipped_documents": skipped,
    }
    if splits["train"]["docs"] == 0:
        raise UserError(f"no documents found in {', '.join(args.sources)}: nothing to write")
    write_json_atomic(out / MANIFEST, manifest)  # last: its presence means every listed shard is complete
    print(f"wrote {out / MANIFEST}")
    print(_summary(manifest))
    return 0
