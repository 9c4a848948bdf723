"""Streaming pipeline: packing, coverage per epoch across ranks and workers, exact resume, bad shards.

Everything runs for real: a corpus prepared with `titans-train prepare` into webdataset tar shards, read with
`webdataset.WebDataset` in real DataLoader worker processes. Sizes are odd on purpose (window 65, batch 3 rows =
lanes, shuffle blocks of 7 documents: not a multiple of 3) so windows straddle documents, blocks, shards and
epochs, and a lane's positions move within the blocks.
"""

import json
import logging
import random
import shutil
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from titans_train.cli import main
from titans_train.data.shards import DataError, Manifest, iter_shard
from titans_train.data.stream import PackedStream, ValStream

EOS = 256
WINDOW = 65  # n_chunks 4 x chunk_len 16 + 1
BATCH = 3


def write_corpus(path, n_docs=300, seed=0):
    """jsonl of documents with lengths 1..150 characters, some non-ASCII (multi-byte UTF-8)."""
    rng = random.Random(seed)
    alphabet = "abcdefghij klmnop\nqrstuvwxyz.,;:éü€漢字🙂"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 150))) for _ in range(n_docs)]
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(prepared dir, {doc bytes: count} of the train split, texts)."""
    root = tmp_path_factory.mktemp("stream")
    texts = write_corpus(root / "docs.jsonl")
    out = root / "shards"
    rc = main(["prepare", str(root / "docs.jsonl"), "--out", str(out), "--shard-size", "16KiB",
               "--val-fraction", "0.2", "--no-progress", "--workers", "1"])
    assert rc == 0
    m = Manifest(out)
    train_docs = [tuple(d.tolist()) for s in m.shards("train") for d in iter_shard(s)]
    assert len(m.shards("train")) >= 8, "the fixture needs shards for 2 ranks x 2 workers with room to spare"
    assert len(train_docs) == m.data["splits"]["train"]["docs"]
    return out, train_docs, texts


def slow_second_worker(worker_id):
    """Worker 1 starts late, so the main process commits batches of worker 0 before worker 1 reads its state:
    the situation in which reading the committed state lazily would pick the wrong stream."""
    if worker_id == 1:
        time.sleep(0.3)


def make(path, rank=0, world_size=1, num_workers=0, slow=False, **kw):
    m = Manifest(path)
    kw = {"shuffle_buffer": 7, "seed": 3, **kw}
    s = PackedStream(m, "train", window_len=WINDOW, batch_size=BATCH, rank=rank, world_size=world_size,
                     num_workers=num_workers, **kw)
    dl = DataLoader(s, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                    prefetch_factor=2 if num_workers else None, worker_init_fn=slow_second_worker if slow else None)
    return s, dl


def take(stream, loader, n):
    """n batches, each committed as if trained on (what the DataModule does). `loader` may be an iterator."""
    out = []
    for b in loader:
        stream.commit(b)
        out.append(b)
        if len(out) == n:
            break
    return out


def unpack(batches):
    """{(stream, row): (tokens, doc_start)}: each lane reassembled from its overlapping windows (row r of every
    batch of a stream; stride L, one shared token)."""
    per = {}
    for b in batches:
        for r, (t, m) in enumerate(zip(b["tokens"], b["doc_start"])):
            per.setdefault((int(b["stream"]), r), []).append((t.numpy(), m.numpy()))
    out = {}
    for s, ws in per.items():
        for (t0, _), (t1, _) in zip(ws, ws[1:]):
            assert t0[-1] == t1[0], "consecutive windows of a lane share one token"
        toks = np.concatenate([ws[0][0]] + [t[1:] for t, _ in ws[1:]])
        mask = np.concatenate([ws[0][1]] + [m[1:] for _, m in ws[1:]])
        out[s] = (toks, mask)
    return out


def test_batch_layout(corpus):
    s, dl = make(corpus[0], num_workers=0)
    b = next(iter(dl))
    assert b["tokens"].shape == (BATCH, WINDOW) and b["tokens"].dtype == torch.int64
    assert b["doc_start"].shape == (BATCH, WINDOW) and b["doc_start"].dtype == torch.bool
    assert b["cursor"].shape == (BATCH, 6) and int(b["stream"]) == 0
    assert b["doc_start"][:, 0].all(), "every lane starts with a document"


@pytest.mark.parametrize("num_workers", [1, 2], ids=["workers1", "workers2"])
def test_every_document_once_per_epoch_across_ranks_and_workers(corpus, num_workers):
    """2 ranks x `num_workers` x 3 lanes: in epoch 0 every train document appears exactly once over all lanes of
    all streams, whole and in order, followed by EOS; doc_start is True exactly at the first token of each
    document. Lane r of a stream holds the documents at positions r, r + 3, ... of the stream's epoch order."""
    path, train_docs, _ = corpus
    world = 2
    seen = Counter()
    for rank in range(world):
        s, dl = make(path, rank=rank, world_size=world, num_workers=num_workers)
        batches, done = [], set()
        for b in dl:  # until every stream of this rank has moved past epoch 0
            s.commit(b)
            batches.append(b)
            if bool((b["cursor"][:, 0] >= 1).all()):  # every lane of this stream is past epoch 0
                done.add(int(b["stream"]))
            if len(done) == s.n_local:
                break
        for (w, r), (toks, mask) in unpack(batches).items():
            g = rank * s.n_local + w
            n_stream = sum(sh.docs for sh in s.epoch_shards(0, g))
            n_docs = len(range(r, n_stream, BATCH))
            ends = np.flatnonzero(toks == EOS)
            assert len(ends) >= n_docs
            starts = np.concatenate([[0], ends[:-1] + 1])
            expected_mask = np.zeros(len(toks), bool)
            expected_mask[starts] = True
            if ends[-1] + 1 < len(toks):
                expected_mask[ends[-1] + 1] = True
            assert np.array_equal(mask, expected_mask), "doc_start marks exactly the tokens after EOS"
            for a, e in zip(starts[:n_docs], ends[:n_docs]):
                seen[tuple(toks[a:e].tolist())] += 1
    assert seen == Counter(train_docs), "no document lost or repeated within epoch 0"


@pytest.mark.parametrize("num_workers", [1, 2], ids=["workers1", "workers2"])
@pytest.mark.parametrize("k", [5, 8], ids=["k5", "k8"])
def test_resume_equals_uninterrupted(corpus, num_workers, k):
    """For 2 simulated ranks: batches after a resume at step k equal the uninterrupted run's, token for token.
    The loaders prefetch (prefetch_factor 2, persistent workers); the state is taken from committed batches."""
    path = corpus[0]
    m_after = 120  # long enough to cross shard, block and epoch boundaries
    for rank in range(2):
        s, dl = make(path, rank=rank, world_size=2, num_workers=num_workers)
        it = iter(dl)
        ref = take(s, it, k)
        state = s.state_dict()
        ref += take(s, it, m_after)  # the same iterator: the uninterrupted run goes on
        assert max(int(b["cursor"][:, 0].max()) for b in ref) >= 1, "the comparison crosses an epoch boundary"
        del dl
        s2, dl2 = make(path, rank=rank, world_size=2, num_workers=num_workers, slow=True)
        s2.load_state_dict(state)
        got = take(s2, dl2, m_after)
        for i, (a, b) in enumerate(zip(ref[k:], got)):
            assert torch.equal(a["tokens"], b["tokens"]), f"rank {rank} batch {k + i} differs after resume"
            assert torch.equal(a["doc_start"], b["doc_start"])
            assert torch.equal(a["cursor"], b["cursor"]) and int(a["stream"]) == int(b["stream"])
        assert len(got) == m_after


def test_resume_twice_and_from_start_state(corpus):
    """Chained resumes (k=4, then +3) equal one run; loading a fresh state reproduces the run from the start."""
    path = corpus[0]
    s, dl = make(path, num_workers=2)
    ref = take(s, dl, 30)
    s1, dl1 = make(path, num_workers=2)
    s1.load_state_dict(make(path, num_workers=2)[0].state_dict())
    part = take(s1, dl1, 4)
    s2, dl2 = make(path, num_workers=2)
    s2.load_state_dict(s1.state_dict())
    part += take(s2, dl2, 3)
    s3, dl3 = make(path, num_workers=2)
    s3.load_state_dict(s2.state_dict())
    part += take(s3, dl3, 23)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(ref, part)) and len(part) == 30


def test_persistent_workers_restart_from_committed_batches(corpus):
    """Breaking off a prefetching loader and iterating it again (what a Lightning epoch end does with persistent
    workers) continues from the last *committed* batch: the prefetched ones are neither lost nor repeated."""
    path = corpus[0]
    s, dl = make(path, num_workers=2)
    ref = take(s, dl, 21)
    s2, dl2 = make(path, num_workers=2, slow=True)
    got = take(s2, dl2, 5) + take(s2, dl2, 7) + take(s2, dl2, 9)  # three "epochs" of the same loader
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(ref, got)) and len(got) == 21


def test_rows_of_a_batch_come_from_different_documents(corpus):
    """No document is shared by two rows of a batch (with one stream per batch, consecutive windows of one stream
    would share the documents longer than a window, which are most of this corpus's)."""
    path = corpus[0]
    s, dl = make(path, num_workers=2)
    batches = take(s, dl, 40)
    doc_of = {}  # (stream, row) -> per-token document content (tokens of the document the token belongs to)
    for key, (toks, _) in unpack(batches).items():
        ends = np.flatnonzero(toks == EOS)
        starts = np.concatenate([[0], ends + 1])
        ids = np.zeros(len(toks), dtype=np.int64)
        ids[starts[1:][starts[1:] < len(toks)]] = 1
        ids = np.cumsum(ids)
        docs = [tuple(toks[a:e].tolist()) for a, e in zip(starts, np.concatenate([ends, [len(toks)]]))]
        doc_of[key] = [docs[i] for i in ids]
    seen = {key: 0 for key in doc_of}
    shared = 0
    for b in batches:
        w = int(b["stream"])
        L = b["tokens"].shape[1] - 1
        rows = []
        for r in range(BATCH):
            i = seen[(w, r)]
            rows.append({d for d in doc_of[(w, r)][i * L : i * L + L + 1] if len(d) >= 3})  # skip tiny docs
            seen[(w, r)] += 1
        for r in range(BATCH):
            for q in range(r):
                shared += len(rows[r] & rows[q])
    assert shared == 0, f"{shared} documents shared between rows of a batch"
    # the old layout (consecutive windows of one stream as rows) would share one in most batches
    one_stream = [t for b in batches for t in b["tokens"][:1]]
    assert sum(int(a[-1] != EOS) for a in one_stream[:-1]) > len(one_stream) // 2, "documents span windows"


def test_batch_size_is_part_of_the_position(corpus):
    """A saved position continues only with as many rows per batch; a stream with fewer documents than rows is an
    error naming data.batch_size."""
    path = corpus[0]
    s, dl = make(path)
    take(s, dl, 2)
    other = PackedStream(Manifest(path), "train", window_len=WINDOW, batch_size=BATCH + 1)
    with pytest.raises(DataError, match="data.batch_size=4"):
        other.load_state_dict(s.state_dict())
    n = len(Manifest(path).shards("train"))
    few = PackedStream(Manifest(path), "train", window_len=WINDOW, batch_size=60, world_size=n, shuffle_buffer=0)
    with pytest.raises(DataError, match="fewer documents in epoch 0 than data.batch_size=60"):
        next(iter(few))


def test_seed_and_shuffle_change_order(corpus):
    path = corpus[0]
    a = take(*make(path, seed=3), 4)
    b = take(*make(path, seed=4), 4)
    c = take(*make(path, seed=3), 4)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, c)), "same seed, same order"
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b)), "another seed, another order"
    plain = take(*make(path, shuffle_buffer=0, shuffle_shards=False), 1)[0]
    first = Manifest(path).shards("train")[0]
    doc0 = next(iter_shard(first))
    assert plain["tokens"][0, : min(len(doc0), WINDOW)].tolist() == doc0[:WINDOW].tolist()
    doc1 = list(iter_shard(first))[1]  # lane 1 starts with the stream's second document
    assert plain["tokens"][1, : min(len(doc1), WINDOW)].tolist() == doc1[:WINDOW].tolist()


def test_validation_stream_same_batches_on_every_rank(corpus):
    path = corpus[0]
    m = Manifest(path)
    lens, all_windows = [], []
    for rank in range(2):
        v = ValStream(m, "validation", window_len=WINDOW, batch_size=2, rank=rank, world_size=2, num_workers=2)
        batches = list(DataLoader(v, batch_size=None, num_workers=2))
        assert len(batches) == v.num_batches() > 0
        lens.append(len(batches))
        all_windows += [tuple(t.tolist()) for b in batches for t in b["tokens"]]
    assert lens[0] == lens[1]
    assert len(set(all_windows)) == len(all_windows), "each validation window is used by one stream only"
    total = m.data["splits"]["validation"]["tokens"] + m.data["splits"]["validation"]["docs"]
    assert len(all_windows) > (total // (WINDOW - 1)) - 2 * 2 * 2, "at most one batch per stream is left out"


# --- bad shards -------------------------------------------------------------------------------------------------


@pytest.fixture
def copy_of(corpus, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(corpus[0], dst)
    return dst


def first_line(e) -> str:
    msg = str(e)
    assert "\n" not in msg, f"error should be one line: {msg!r}"
    return msg


def test_missing_shard(copy_of):
    victim = copy_of / "train-00003.tar"
    victim.unlink()
    with pytest.raises(DataError) as e:
        make(copy_of)
    assert str(victim) in first_line(e.value) and "missing" in str(e.value) and "prepare" in str(e.value)


def test_truncated_shard(copy_of):
    victim = copy_of / "train-00002.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError) as e:
        make(copy_of)
    msg = first_line(e.value)
    assert str(victim) in msg and "truncated" in msg and "skip_corrupt" in msg


def test_tar_cut_at_member_boundary_is_detected(copy_of):
    """A tar cut exactly between members reads as a valid, shorter tar: the document count catches it."""
    victim = copy_of / "train-00001.tar"
    with tarfile.open(victim) as tf:
        cut = tf.getmembers()[2].offset  # two whole samples, no end-of-archive blocks
    victim.write_bytes(victim.read_bytes()[:cut])
    mf = copy_of / "manifest.json"
    man = json.loads(mf.read_text())
    man["splits"]["train"]["shards"][1]["bytes"] = cut  # pretend the manifest agrees with the size
    mf.write_text(json.dumps(man))
    shard = Manifest(copy_of).shards("train")[1]
    with pytest.raises(DataError) as e:
        list(iter_shard(shard))
    assert str(victim) in first_line(e.value) and "holds 2 documents but the manifest says" in str(e.value)


def test_corrupt_shard_in_worker_is_one_line_error(copy_of):
    victim = copy_of / "train-00000.tar"
    data = bytearray(victim.read_bytes())
    data[600:1800] = b"\xff" * 1200  # same size, garbage where the first .npy and the next header are
    victim.write_bytes(bytes(data))
    s, dl = make(copy_of, num_workers=2, shuffle_shards=False)
    with pytest.raises(DataError) as e:
        take(s, dl, 200)
    msg = first_line(e.value)
    assert str(victim) in msg and "corrupt" in msg and "skip_corrupt" in msg


def test_skip_corrupt_warns_counts_and_goes_on(copy_of, caplog):
    victim = copy_of / "train-00000.tar"
    data = bytearray(victim.read_bytes())
    data[600:1800] = b"\xff" * 1200
    victim.write_bytes(bytes(data))
    short = copy_of / "train-00004.tar"
    short.write_bytes(short.read_bytes()[:2000])
    with caplog.at_level(logging.WARNING):
        s, dl = make(copy_of, num_workers=0, skip_corrupt=True, shuffle_shards=False)
        assert s.skipped_shards == [str(short)]
        got = take(s, dl, 150)
    assert len(got) == 150
    assert any(str(victim) in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert any(str(short) in r.getMessage() for r in caplog.records)


def test_too_few_shards_for_streams(corpus):
    n = len(Manifest(corpus[0]).shards("train"))
    with pytest.raises(DataError, match="fewer than the"):
        make(corpus[0], world_size=n, num_workers=2)


def test_num_workers_mismatch(corpus):
    s = PackedStream(Manifest(corpus[0]), "train", window_len=WINDOW, batch_size=BATCH, num_workers=2)
    with pytest.raises(DataError, match="num_workers=2"):
        next(iter(DataLoader(s, batch_size=None, num_workers=0)))
