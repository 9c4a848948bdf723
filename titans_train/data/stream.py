"""Streaming shards -> packed windows of `n_chunks * chunk_len + 1` tokens with document-start masks.

Streams. Each rank runs `num_workers` DataLoader workers (at least one stream per rank); every worker is one
*stream* and reads its own shards: in epoch `e` the shards are permuted with seed (seed, e) and stream `g` of
`world_size * num_workers` takes every `n`-th of them (split by node, then by worker). Each stream runs through
its epochs on its own, so within any stream's epoch `e` the union over streams is every shard exactly once.

Rows. A batch of `batch_size` rows is cut from `batch_size` *lanes* of one stream: lane `r` takes the documents
at positions `r, r + B, r + 2B, ...` of the stream's epoch order and packs them on its own, and row `r` of every
batch continues lane `r`. So the rows of a batch come from different documents (consecutive windows of one lane
would share a document), and within a stream's epoch the union over its lanes is every document exactly once.
Each lane reads the stream's shards itself (parsing B times, keeping only its own documents).

Shuffling. A stream reads its documents in blocks of `shuffle_buffer` consecutive documents and emits each
block in a permutation seeded by (seed, epoch, stream, block): a sample buffer emptied in blocks. Compared with
webdataset's reservoir buffer it mixes as far and keeps the resume cursor to six integers per lane.

Packing. A lane joins its documents with EOS after each document; windows of `L + 1` tokens are cut with stride
`L` (the last token of a window is the first of the lane's next), so every token of the lane is a target exactly
once. `doc_start[t]` is True where token `t` is the first token of a document. Nothing is dropped or padded in the
infinite training stream; the validation stream drops its tail (less than one batch of windows per stream).

Exact resume. A batch carries `cursor` (B, 6): per lane the six integers (epoch, block, block's first shard,
block's first document in that shard, position in the block, token offset in that document) at which the lane
continues, and `stream`, the stream's index on this rank. `PackedStream.commit(batch)` records them when a batch
is *used* (the DataModule does it in `on_before_batch_transfer`, which Lightning runs for the batch it trains on,
not for the one it prefetched). Because the DataLoader takes batches from its workers round-robin in order, after
`k` committed batches the next batch comes from stream `k % num_workers`; a resumed loader lets its worker `j`
play stream `(j + k) % num_workers`, so it yields exactly the batches an uninterrupted run would have. The
committed cursors live in shared memory that each worker reads when it (re)starts iterating, so persistent
workers that restart an epoch of the loader resume from what was trained on, not from what they had prefetched.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from titans_train.data.shards import DataError, Manifest, ShardInfo, check_shards, iter_shard

CURSOR_FIELDS = ("epoch", "block", "block_shard", "block_doc", "pos", "offset")
_NO_SHUFFLE_BLOCK = 256  # documents per block when shuffling is off (the block only bounds resume work)


class _Packer:
    """Joins pieces (token arrays tagged with the cursor of their first token) into windows of L+1 tokens with
    stride L, and knows the cursor of any pending position."""

    def __init__(self, window_len: int):
        self.L1 = window_len
        self.toks: list[np.ndarray] = []
        self.starts: list[tuple[int, bool]] = []  # (position, is a document start) of every piece
        self.cursors: list[tuple] = []  # cursor of the first token of every piece
        self.n = 0

    def add(self, cursor: tuple, toks: np.ndarray, doc_start: bool):
        self.toks.append(toks)
        self.starts.append((self.n, doc_start))
        self.cursors.append(cursor)
        self.n += len(toks)

    def windows(self) -> Iterator[tuple[np.ndarray, np.ndarray, tuple]]:
        """(tokens (L+1,), doc_start (L+1,), cursor of the next window) for every complete window pending."""
        if self.n < self.L1:
            return
        L = self.L1 - 1
        buf = np.concatenate(self.toks) if len(self.toks) > 1 else self.toks[0]
        pos = np.array([p for p, _ in self.starts])
        mask = np.zeros(self.n, dtype=bool)
        mask[[p for p, s in self.starts if s]] = True
        s = 0
        while self.n - s >= self.L1:
            s += L
            yield buf[s - L : s + 1], mask[s - L : s + 1], self._cursor_at(pos, s)
        # keep the tail from s (s < n): one piece, with the piece metadata rebased
        first = int(np.searchsorted(pos, s, side="right")) - 1
        c = self.cursors[first]
        self.cursors = [c[:5] + (c[5] + s - int(pos[first]),)] + self.cursors[first + 1 :]
        self.starts = [(0, s == pos[first] and self.starts[first][1])] + [
            (p - s, d) for p, d in self.starts[first + 1 :]
        ]
        self.toks = [buf[s:]]
        self.n -= s

    def _cursor_at(self, pos: np.ndarray, s: int) -> tuple:
        i = int(np.searchsorted(pos, s, side="right")) - 1
        c = self.cursors[i]
        return c[:5] + (c[5] + s - int(pos[i]),)


class PackedStream(IterableDataset):
    """Infinite training stream of batches {tokens (B, L+1) int64, doc_start (B, L+1) bool, cursor (B, 6),
    stream ()} for one rank; see the module docstring for the order, the lanes, the cursor and exact resume.

    Args:
        manifest: the prepared dataset.
        split: manifest split to read (e.g. "train").
        window_len: tokens per window, `n_chunks * chunk_len + 1`.
        batch_size: windows per batch, one per lane of the stream.
        rank, world_size: this process's place among the data-parallel ranks.
        num_workers: the DataLoader's `num_workers` (0: the main process is the one stream of this rank).
        seed, shuffle_shards, shuffle_buffer, skip_corrupt: as in `DataConfig`.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        *,
        window_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1024,
        skip_corrupt: bool = False,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if window_len < 2:
            raise ValueError(f"window_len={window_len} must be >= 2")
        self.shards, self.skipped_shards = check_shards(manifest.shards(split), skip_corrupt)
        self.eos_id = int(manifest.tokenizer["eos_id"])
        self.window_len, self.batch_size = window_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.n_local = max(num_workers, 1)
        self.n_streams = world_size * self.n_local
        if len(self.shards) < self.n_streams:
            raise DataError(
                f"{manifest.path}: split {split!r} has {len(self.shards)} usable shards, fewer than the "
                f"{world_size} ranks x {self.n_local} workers = {self.n_streams} streams that each need one: "
                "re-run `titans-train prepare` with a smaller --shard-size, or use fewer data.num_workers"
            )
        self.seed, self.shuffle_shards, self.skip_corrupt = seed, shuffle_shards, skip_corrupt
        self.block_docs = shuffle_buffer if shuffle_buffer > 1 else _NO_SHUFFLE_BLOCK
        self.shuffle_docs = shuffle_buffer > 1
        # Committed state, twice: in shared memory, which a persistent worker reads when it restarts iterating,
        # and as plain values, which a worker inherits when it is created (see `__iter__`).
        self._cursors = torch.zeros(self.n_local, batch_size, len(CURSOR_FIELDS), dtype=torch.long).share_memory_()
        self._consumed = torch.zeros(1, dtype=torch.long).share_memory_()
        self._plain = (0, self._cursors.tolist())
        self._iterated_here = False

    # --- state -------------------------------------------------------------------------------------------------

    def commit(self, batch: dict) -> None:
        """Record that `batch` was used: its stream's lanes continue at batch["cursor"] (B, 6)."""
        self._cursors[int(batch["stream"])] = batch["cursor"]
        self._consumed += 1
        self._plain = (int(self._consumed), self._cursors.tolist())

    def state_dict(self) -> dict:
        """This rank's position: batches consumed and, per stream, one cursor per lane (plain ints, safe to
        torch.load)."""
        return {"consumed": int(self._consumed), "cursors": self._cursors.tolist()}

    def load_state_dict(self, state: dict) -> None:
        cursors = torch.as_tensor(state["cursors"], dtype=torch.long)
        if cursors.dim() != 3 or cursors.shape[0] != self.n_local:
            raise DataError(
                f"the checkpoint's data cursor has {cursors.shape[0]} streams per rank, this loader has "
                f"{self.n_local}: resume with the same data.num_workers to continue the data exactly"
            )
        if cursors.shape[1] != self.batch_size:
            raise DataError(
                f"the checkpoint's data cursor has {cursors.shape[1]} lanes (rows) per stream, this loader has "
                f"data.batch_size={self.batch_size}: resume with the same data.batch_size to continue the data exactly"
            )
        self._cursors.copy_(cursors)
        self._consumed.fill_(int(state["consumed"]))
        self._plain = (int(self._consumed), self._cursors.tolist())

    # --- order ---------------------------------------------------------------------------------------------------

    def epoch_shards(self, epoch: int, stream: int) -> list[ShardInfo]:
        """The shards global stream `stream` reads in `epoch`, in order."""
        n = len(self.shards)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle_shards else np.arange(n)
        return [self.shards[i] for i in order[stream :: self.n_streams]]

    def _block_perm(self, epoch: int, stream: int, block: int, n: int) -> np.ndarray:
        if not self.shuffle_docs:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, stream, block, 1]).permutation(n)

    def _docs(self, shards: list[ShardInfo], s: int, d: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(shard position, document index, tokens) from document d of shard s to the end of the epoch."""
        while s < len(shards):
            for arr in iter_shard(shards[s], skip=d, skip_corrupt=self.skip_corrupt):
                yield s, d, arr
                d += 1
            s, d = s + 1, 0

    def _pieces(self, stream: int, lane: int, cursor: tuple) -> Iterator[tuple[tuple, np.ndarray, bool]]:
        """(cursor of the first token, tokens, starts a document) of every document (+EOS) of lane `lane` of
        stream `stream`: the documents at positions lane, lane + B, ... of the stream's order in each epoch."""
        epoch, block, bs, bd, pos, offset = cursor
        B = self.batch_size
        while True:
            shards = self.epoch_shards(epoch, stream)
            reader = self._docs(shards, bs, bd)
            blocks_read = mine = 0
            whole_epoch = (block, pos, offset) == (0, 0, 0)
            while True:
                docs, last = [], None
                for last in reader:
                    docs.append(last[2])
                    if len(docs) == self.block_docs:
                        break
                if not docs:
                    break
                blocks_read += 1
                perm = self._block_perm(epoch, stream, block, len(docs))
                first = block * self.block_docs  # epoch position of the block's first document
                positions = range(pos + (lane - first - pos) % B, len(docs), B)  # this lane's, from pos on
                picked = [docs[perm[p]] for p in positions]
                del docs  # hold only this lane's documents while they are packed
                for p, d in zip(positions, picked):
                    mine += 1
                    toks = np.empty(len(d) + 1, dtype=d.dtype)
                    toks[:-1], toks[-1] = d, self.eos_id
                    yield (epoch, block, bs, bd, p, offset), toks[offset:], offset == 0
                    offset = 0
                # the next block starts after the last document read
                s, d = last[0], last[1] + 1
                if d >= shards[s].docs:
                    s, d = s + 1, 0
                block, bs, bd, pos = block + 1, s, d, 0
            reader.close()
            if blocks_read == 0 and block == 0:
                raise DataError(
                    f"data stream {stream} found no readable documents in its shards for epoch {epoch} "
                    f"({', '.join(str(s.path) for s in shards)}): re-run `titans-train prepare`"
                )
            if mine == 0 and whole_epoch:
                raise DataError(
                    f"data stream {stream} has fewer documents in epoch {epoch} than data.batch_size={B} rows, "
                    "each of which reads its own documents: lower data.batch_size or data.num_workers, or prepare "
                    "more data"
                )
            epoch, block, bs, bd, pos, offset = epoch + 1, 0, 0, 0, 0, 0

    def __iter__(self) -> Iterator[dict]:
        """Called when an iteration starts: in the main process (num_workers 0), in a new worker when it starts,
        in a persistent worker when the loader restarts (torch sends it a resume message once the main process
        has stopped taking batches). The committed state is read *here*, not lazily at the first batch: by then
        the main process may already have committed a batch from another worker."""
        info = get_worker_info()
        j, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if n != self.n_local:
            raise DataError(
                f"the data stream was built for num_workers={self.n_local if self.n_local > 1 else 0} but runs "
                f"in a DataLoader with {n if info else 0}: pass the same num_workers to both"
            )
        if info is not None and not self._iterated_here:
            # A new worker: the plain copy it inherited (fork) or received (spawn) is the state when the
            # loader started; the shared tensors may have moved on since.
            consumed, cursors = self._plain
        else:
            consumed, cursors = int(self._consumed), self._cursors.tolist()
        self._iterated_here = True
        w = (j + consumed) % self.n_local  # the DataLoader restarts its round-robin at worker 0
        return self._batches(w, [tuple(c) for c in cursors[w]])

    def _lane_windows(self, g: int, lane: int, cursor: tuple) -> Iterator[tuple[np.ndarray, np.ndarray, tuple]]:
        """(tokens (L+1,), doc_start (L+1,), cursor after it) of every window of one lane."""
        packer = _Packer(self.window_len)
        for cur, piece, doc_start in self._pieces(g, lane, cursor):
            packer.add(cur, piece, doc_start)
            yield from packer.windows()

    def _batches(self, w: int, cursors: list[tuple]) -> Iterator[dict]:
        g = self.rank * self.n_local + w
        lanes = [self._lane_windows(g, r, c) for r, c in enumerate(cursors)]
        stream_id = torch.tensor(w)
        while True:
            toks, masks, nxt = zip(*(next(lane) for lane in lanes))  # row r continues lane r
            yield {
                "tokens": torch.from_numpy(np.stack(toks).astype(np.int64)),  # (B, L+1)
                "doc_start": torch.from_numpy(np.stack(masks)),  # (B, L+1)
                "cursor": torch.tensor(nxt, dtype=torch.long),  # (B, 6)
                "stream": stream_id,
            }


class ValStream(IterableDataset):
    """One pass over a (small) validation split, the same number of batches on every rank.

    Every stream reads the split in order (no shuffle) and packs it like the training stream; window `i` goes to
    stream `i % (world_size * num_workers)`. Only the first `W'` windows are used, `W'` the largest multiple of
    `streams * batch_size` that the split holds (capped by `max_batches` per rank), so each stream yields the
    same number of full batches and no rank waits for another in validation.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        *,
        window_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        max_batches: int | None = None,
        skip_corrupt: bool = False,
    ):
        super().__init__()
        self.shards, self.skipped_shards = check_shards(manifest.shards(split), skip_corrupt)
        self.eos_id = int(manifest.tokenizer["eos_id"])
        self.window_len, self.batch_size, self.skip_corrupt = window_len, batch_size, skip_corrupt
        self.rank, self.n_local = rank, max(num_workers, 1)
        self.n_streams = world_size * self.n_local
        total = sum(s.tokens + s.docs for s in self.shards)  # + one EOS per document
        windows = max(total - 1, 0) // (window_len - 1)
        per_stream = windows // (self.n_streams * batch_size)  # batches
        if max_batches is not None:
            per_stream = min(per_stream, -(-max_batches // self.n_local))
        self.batches_per_stream = per_stream

    def num_batches(self) -> int:
        """Batches one pass yields on this rank (the same on every rank). Not `__len__`: Lightning warns about
        lengths of iterable datasets with several workers, and nothing here needs it."""
        return self.batches_per_stream * self.n_local

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = info.id if info is not None else 0
        g = self.rank * self.n_local + w
        need = self.batches_per_stream * self.batch_size
        if need == 0:
            return
        packer = _Packer(self.window_len)
        toks, masks, i, taken = [], [], 0, 0
        for shard in self.shards:
            for d in iter_shard(shard, skip_corrupt=self.skip_corrupt):
                piece = np.empty(len(d) + 1, dtype=d.dtype)
                piece[:-1], piece[-1] = d, self.eos_id
                packer.add((0, 0, 0, 0, 0, 0), piece, True)
                for t, m, _ in packer.windows():
                    if i % self.n_streams == g:
                        toks.append(t)
                        masks.append(m)
                        if len(toks) == self.batch_size:
                            yield {"tokens": torch.from_numpy(np.stack(toks).astype(np.int64)),
                                   "doc_start": torch.from_numpy(np.stack(masks))}
                            toks, masks = [], []
                            taken += self.batch_size
                            if taken == need:
                                return
                    i += 1
