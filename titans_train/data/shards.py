"""Webdataset token shards and their manifest: deterministic atomic writing, checked reading.

A shard is a plain tar of samples `<split>-<shard>-<doc>.npy`, one whole document per sample as a 1-D uint16
(or uint32) array, written with fixed tar metadata (mtime 0, uid/gid 0, fixed names, mode 0444) so that the same
input gives byte-identical shards. A shard is written as `X.tar.tmp` and renamed when complete; `manifest.json`
is written last (also via a rename), so an interrupted `prepare` never leaves a dataset that looks complete: the
loader reads only shards the manifest lists, and checks their sizes and document counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from titans_train.cli import UserError

log = logging.getLogger(__name__)
# Shards skipped with data.skip_corrupt in this process (each DataLoader worker counts its own); logged each time.
skipped_count = 0

FORMAT = "titans-train/token-shards"
VERSION = 1
MANIFEST = "manifest.json"
_TAR_BLOCK = 512


class DataError(UserError):
    """A problem with prepared data (missing/corrupt shard, wrong tokenizer): one line that names the file.

    Raised inside a DataLoader worker, torch re-raises it in the main process as `DataError(traceback text)`;
    the constructor recovers the original one-line message so the CLI still prints one line.
    """

    def __init__(self, msg: str):
        if msg.startswith("Caught DataError") and "Original Traceback" in msg:
            lines = [ln for ln in msg.strip().splitlines() if "DataError: " in ln]
            if lines:
                msg = lines[-1].split("DataError: ", 1)[1]
        super().__init__(msg)


# --- writing -----------------------------------------------------------------------------------------------------


def npy_bytes(tokens: np.ndarray) -> bytes:
    """A 1-D array as .npy bytes (no pickling; the header is deterministic)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    return buf.getvalue()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SplitWriter:
    """Writes one split's documents into shards `<split>-00000.tar`, ... of about `shard_bytes` each."""

    def __init__(self, out_dir: Path, split: str, shard_bytes: int, dtype: np.dtype):
        self.out_dir, self.split, self.shard_bytes, self.dtype = Path(out_dir), split, shard_bytes, np.dtype(dtype)
        self.shards: list[dict] = []
        self._file = self._tar = None
        self._docs = self._tokens = self._bytes = 0

    def _open(self):
        import webdataset as wds

        self._path = self.out_dir / f"{self.split}-{len(self.shards):05d}.tar"
        self._tmp = self._path.with_name(self._path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        # Fixed metadata: mtime 0, user/group names fixed, uid/gid 0 (TarInfo default), mode 0444. mtime must be
        # the int 0: a float makes tarfile add a 1 KiB PAX header to every member (and halves read speed).
        self._tar = wds.TarWriter(self._file, user="titans", group="titans", mode=0o444, encoder=False, mtime=0)
        self._docs = self._tokens = self._bytes = 0

    def add(self, tokens: np.ndarray):
        if self._tar is None:
            self._open()
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise UserError(f"token id {int(tokens.max())} does not fit {self.dtype}: use --dtype uint32 or auto")
        data = npy_bytes(tokens.astype(self.dtype, copy=False))
        key = f"{self.split}-{len(self.shards):05d}-{self._docs:07d}"
        self._tar.write({"__key__": key, "npy": data})
        self._docs += 1
        self._tokens += int(tokens.size)
        self._bytes += _TAR_BLOCK + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK
        if self._bytes >= self.shard_bytes:
            self._finish()

    def _finish(self):
        self._tar.close()  # writes the end-of-archive blocks; leaves our file open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._path)  # atomic: a .tar on disk is always complete
        self.shards.append(
            {
                "path": self._path.name,
                "docs": self._docs,
                "tokens": self._tokens,
                "bytes": self._path.stat().st_size,
                "sha256": _file_sha256(self._path),
            }
        )
        self._file = self._tar = None

    def close(self) -> dict:
        if self._tar is not None:
            self._finish()
        return {
            "docs": sum(s["docs"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
            "shards": self.shards,
        }

    def abort(self):
        """Drop the shard being written (after an error): only complete shards stay, and without a manifest."""
        if self._file is not None:
            try:
                self._tar.close()  # flushes tarfile's buffer into the file we are about to delete
            finally:
                self._file.close()
                self._tmp.unlink(missing_ok=True)
            self._file = self._tar = None


def write_json_atomic(path: Path, obj: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --- manifest ----------------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    path: Path
    docs: int
    tokens: int
    bytes: int


class Manifest:
    """`manifest.json` of a prepared dataset: splits -> shards with counts, tokenizer, dtype, sources, command."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / MANIFEST
        self.path, self.root = path, path.parent
        if not path.is_file():
            raise DataError(
                f"{path} not found: prepare the data first, e.g. `titans-train prepare builtin --out {self.root}`"
            )
        try:
            self.data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e}): re-run `titans-train prepare` into that directory")
        if self.data.get("format") != FORMAT:
            raise DataError(f"{path} is not a titans-train shard manifest (format {self.data.get('format')!r})")
        self.tokenizer: dict = self.data["tokenizer"]
        self.dtype = np.dtype(self.data["dtype"])
        if self.tokenizer["vocab_size"] > np.iinfo(self.dtype).max + 1:
            raise DataError(
                f"{path}: dtype {self.dtype} cannot hold the tokenizer's {self.tokenizer['vocab_size']} ids: "
                "re-run prepare with --dtype uint32 (or auto)"
            )

    def splits(self) -> list[str]:
        return sorted(self.data["splits"])

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.data["splits"]:
            raise DataError(f"{self.path} has no split {split!r} (it has {', '.join(self.splits())})")
        return [
            ShardInfo(self.root / s["path"], s["docs"], s["tokens"], s["bytes"]) for s in self.data["splits"][split]["shards"]
        ]

    def load_tokenizer(self, spec: str = "manifest"):
        """The tokenizer `spec` names (`manifest`: the one the shards were made with), checked against the shards."""
        from titans_train.data.tokenizer import load_tokenizer

        rec = self.tokenizer
        if spec == "manifest":
            if rec["kind"] == "byte":
                spec = "byte"
            else:
                spec = str(self.root / rec["path"]) if not Path(rec["path"]).is_absolute() else rec["path"]
        tok = load_tokenizer(spec, eos_token=rec.get("eos_token"))
        if tok.fingerprint() != rec["fingerprint"]:
            raise DataError(
                f"{self.path} was prepared with tokenizer {rec['kind']}:{rec.get('path') or 'byte'} "
                f"(fingerprint {rec['fingerprint'][:12]}, vocab {rec['vocab_size']}) but the recipe asks for {spec} "
                f"(fingerprint {tok.fingerprint()[:12]}, vocab {tok.vocab_size}): set data.tokenizer to the manifest's "
                "tokenizer (or `manifest`), or re-run `titans-train prepare` with --tokenizer " + spec
            )
        return tok


def check_shards(shards: list[ShardInfo], skip_corrupt: bool) -> tuple[list[ShardInfo], list[str]]:
    """Existence and size of every shard, before any worker starts. Missing: always an error. Wrong size
    (truncated or rewritten): an error, or with skip_corrupt dropped with a warning. Returns (kept, skipped)."""
    kept, skipped = [], []
    for s in shards:
        if not s.path.is_file():
            raise DataError(
                f"shard {s.path} is listed in the manifest but missing: restore it, or re-run `titans-train prepare`"
            )
        size = s.path.stat().st_size
        if size != s.bytes:
            msg = f"shard {s.path} has {size} bytes but the manifest says {s.bytes}: it is truncated or was rewritten"
            if not skip_corrupt:
                raise DataError(msg + "; re-run `titans-train prepare`, or set data.skip_corrupt=true to skip it")
            log.warning("%s; skipping it (data.skip_corrupt; %d skipped)", msg, len(skipped) + 1)
            skipped.append(str(s.path))
            continue
        kept.append(s)
    return kept, skipped


# --- reading -----------------------------------------------------------------------------------------------------


_NPY_HEADER = re.compile(rb"\{'descr': '(<u2|<u4)', 'fortran_order': False, 'shape': \((\d+),\), \}\s*$")


def decode_npy(data: bytes, where: str) -> np.ndarray:
    """.npy bytes -> 1-D uint16/uint32 array, never unpickling. The headers `np.save` writes for our arrays are
    parsed directly (np.load's literal_eval costs more than the copy); anything else goes through np.load."""
    if data[:8] == b"\x93NUMPY\x01\x00":
        n = int.from_bytes(data[8:10], "little")
        m = _NPY_HEADER.match(data[10 : 10 + n])
        if m:
            count = int(m.group(2))
            if len(data) != 10 + n + count * (2 if m.group(1) == b"<u2" else 4):
                raise ValueError(f"sample {where}: .npy data has {len(data) - 10 - n} bytes for {count} tokens")
            return np.frombuffer(data, dtype=m.group(1).decode(), count=count, offset=10 + n)
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 1 or arr.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"sample {where} is a {arr.dtype} array of shape {arr.shape}, expected 1-D uint16/uint32")
    return arr


def iter_shard(shard: ShardInfo, skip: int = 0, skip_corrupt: bool = False) -> Iterator[np.ndarray]:
    """The documents of one shard in order, after the first `skip`, read with `webdataset.WebDataset`.

    A read or decode error, or fewer documents than the manifest lists (a tar cut at a member boundary reads as
    a short but valid tar), raises DataError naming the shard; with `skip_corrupt` the rest of the shard is
    skipped with a warning instead (documents already read are kept: the outcome is still deterministic).
    """
    import webdataset as wds

    ds = wds.WebDataset(
        [str(shard.path)], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )
    n = 0
    problem = None
    try:
        for sample in ds:
            if n >= skip:
                if "npy" not in sample:
                    raise ValueError(f"sample {sample.get('__key__')} has no .npy member")
                yield decode_npy(sample["npy"], sample["__key__"])
            n += 1
    except Exception as e:  # tarfile / webdataset / numpy errors all mean: this shard is unreadable
        detail = " ".join(str(e).split())
        problem = f"shard {shard.path} is corrupt or truncated after {n} of {shard.docs} documents ({detail})"
    if problem is None and n != shard.docs:
        problem = f"shard {shard.path} holds {n} documents but the manifest says {shard.docs}: it is truncated"
    if problem is not None:
        if not skip_corrupt:
            raise DataError(problem + "; re-run `titans-train prepare`, or set data.skip_corrupt=true to skip it")
        global skipped_count
        skipped_count += 1
        log.warning("%s; skipping the rest of it (data.skip_corrupt; %d skipped in this process)", problem, skipped_count)
