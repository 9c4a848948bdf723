"""Document sources for `prepare`: the built-in corpus, local files and globs, Hugging Face datasets.

A source is expanded into *units* (a batch of files, one file, one parquet row group, a batch of streamed
rows), each read by `read_unit` into `(doc_id, text)` pairs; units are what `prepare` spreads over processes.
Order is deterministic everywhere: files sorted, rows in file order. A document's split comes from a hash of
its id, so it does not depend on the order or on which other documents are present.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterator

from titans_train.cli import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
BUILTIN_FILES_PER_UNIT = 32
HF_ROWS_PER_UNIT = 512


def split_of(doc_id: str, val_fraction: float) -> str:
    """'validation' for a stable `val_fraction` of document ids (by sha256), else 'train'."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return "validation" if h < val_fraction * 2**64 else "train"


# --- the built-in corpus: the installed Python standard library ---------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_files(root: Path | None = None) -> list[str]:
    """Relative paths of the stdlib's .py files, sorted (third-party site-packages and caches excluded)."""
    root = root or stdlib_root()
    rels = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or "__pycache__" in rel.parts or not p.is_file():
            continue
        rels.append(rel.as_posix())
    return sorted(rels)


def builtin_units(limit: int | None) -> list[tuple]:
    """Stdlib source files in batches, then the pydoc documentation topics (one document per topic)."""
    files = builtin_files()
    if limit is not None:
        files = files[:limit]
    units: list[tuple] = [
        ("stdlib", tuple(files[i : i + BUILTIN_FILES_PER_UNIT])) for i in range(0, len(files), BUILTIN_FILES_PER_UNIT)
    ]
    if limit is None or limit > len(files):
        units.append(("pydoc_topics", None if limit is None else limit - len(files)))
    return units


# --- local files -------------------------------------------------------------------------------------------------


def passkey_units(spec: str, limit: int | None) -> list[tuple]:
    """`passkey[:docs=N,digits=D,min_len=A,max_len=B]`: synthetic passkey documents, in units of 1000."""
    from titans_train.eval.niah import parse_passkey_spec

    try:
        opts = parse_passkey_spec(spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    n = min(opts["docs"], limit) if limit is not None else opts["docs"]
    return [("passkey", i, min(i + 1000, n), opts) for i in range(0, n, 1000)]


def expand_local(pattern: str) -> list[Path]:
    """Files a path or glob names, sorted; an empty match or an unknown suffix is a UserError."""
    matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    files = [Path(m) for m in matches if Path(m).is_file()]
    if not files:
        if glob.has_magic(pattern):
            raise UserError(f"input glob {pattern!r} matches no files: check the path (quote globs for the shell)")
        raise UserError(f"input {pattern} does not exist: give `builtin`, `hf:NAME`, or a local file or glob")
    for f in files:
        if not f.name.endswith(TEXT_SUFFIXES):
            raise UserError(f"input {f}: unsupported file type; use {', '.join(TEXT_SUFFIXES)}")
    return files


def local_units(pattern: str) -> list[tuple]:
    units = []
    for f in expand_local(pattern):
        if f.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                n_groups = pq.ParquetFile(f).num_row_groups
            except Exception as e:
                raise UserError(f"input {f} is not a readable parquet file ({e})") from e
            units += [("parquet", str(f), g) for g in range(n_groups)]
        else:
            units.append(("file", str(f)))
    return units


def _jsonl_text(f: Path, lineno: int, line: str, field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{f}:{lineno} is not valid JSON ({e.msg}): fix or remove that line") from e
    if not isinstance(row, dict) or field not in row:
        raise UserError(f"{f}:{lineno} has no field {field!r}: choose the text field with --text-field")
    text = row[field]
    if not isinstance(text, str):
        raise UserError(f"{f}:{lineno}: field {field!r} is a {type(text).__name__}, not text (--text-field)")
    return text


def read_unit(unit: tuple, text_field: str = "text") -> Iterator[tuple[str, str | None]]:
    """(doc_id, text) for every document of a unit; text None marks a document that was skipped (not UTF-8)."""
    kind = unit[0]
    if kind == "stdlib":
        root = stdlib_root()
        for rel in unit[1]:
            try:
                yield f"stdlib/{rel}", (root / rel).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                yield f"stdlib/{rel}", None  # a few test files are deliberately latin-1/koi8-r or invalid
    elif kind == "pydoc_topics":
        from pydoc_data.topics import topics

        keys = sorted(topics)
        if unit[1] is not None:
            keys = keys[: unit[1]]
        for k in keys:
            yield f"pydoc_topics/{k}", topics[k]
    elif kind == "file":
        f = Path(unit[1])
        if f.name.endswith(".txt"):
            try:
                yield f.name, f.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                yield f.name, None
            return
        opener = gzip.open if f.name.endswith(".gz") else open
        try:
            with opener(f, "rt", encoding="utf-8", newline="") as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        yield f"{f.name}:{i}", _jsonl_text(f, i, line, text_field)
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise UserError(f"input {f} cannot be read ({e}): check or remove the file") from e
    elif kind == "parquet":
        import pyarrow.parquet as pq

        f, group = Path(unit[1]), unit[2]
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            raise UserError(f"{f} has no column {text_field!r} (it has {pf.schema_arrow.names}): use --text-field")
        col = pf.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        start = sum(pf.metadata.row_group(g).num_rows for g in range(group))
        for i, text in enumerate(col):
            yield f"{f.name}:{start + i}", text
    elif kind == "rows":
        yield from unit[1]
    elif kind == "passkey":  # synthetic: the needle-in-a-haystack prompt format of titans_train/eval/niah.py
        from titans_train.eval.niah import passkey_document

        start, stop, opts = unit[1], unit[2], unit[3]
        for i in range(start, stop):
            yield f"passkey/{i}", passkey_document(i, opts["digits"], opts["min_len"], opts["max_len"])
    else:  # pragma: no cover
        raise ValueError(f"unknown unit {kind}")


# --- Hugging Face datasets (needs the `hf` extra and, for hub names, network access) -------------------------------


def hf_units(spec: str, text_field: str, split: str, config: str | None, limit: int | None) -> Iterator[tuple]:
    """Rows of a Hugging Face dataset (hub name or local path), streamed, in batches of rows."""
    try:
        import datasets
    except ImportError as e:
        raise UserError("hf: sources need the `datasets` package: pip install 'titans-train[hf]'") from e
    name = spec[3:]
    try:
        saved = ("dataset_info.json", "state.json", "dataset_dict.json")  # what `save_to_disk` writes
        if Path(name).is_dir() and any((Path(name) / f).is_file() for f in saved):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        raise UserError(f"{spec}: cannot load the dataset ({type(e).__name__}: {e})") from e
    batch: list = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        if text_field not in row:
            raise UserError(f"{spec}: rows have no field {text_field!r} ({', '.join(row)}): use --text-field")
        batch.append((f"{name}:{i}", row[text_field]))
        if len(batch) == HF_ROWS_PER_UNIT:
            yield ("rows", batch)
            batch = []
    if batch:
        yield ("rows", batch)
