"""Single-needle retrieval (needle in a haystack) in the style of RULER's S-NIAH, streamed through the state.

A sample is `haystack[:p] + needle + haystack[p:] + question`, `length` tokens in all, the needle at depth
`p / len(haystack)`; the model's greedy continuation of the question is scored by exact match with the value:

    needle    "One of the special magic numbers for <key> is: <value>."
    question  "What is the special magic number for <key>? The special magic number for <key> is: "

Needles (`NEEDLES`): passkey (key "the passkey", a number of `digits` digits, 5 by default), number (a random
word key, 7 digits), uuid (a random word key, a seeded UUID). Haystacks: noise (a repeated filler paragraph,
RULER's) or corpus (held-out documents of a prepared dataset, EOS between them, cycled when exhausted).

Every sample is generated lazily in pieces of at most `piece_len` tokens (`Sample.pieces`) and fed to the model
with its state carried, so memory stays flat in `length` (2,097,152 tokens and beyond): no (T,) token array,
no logits beyond one piece. Samples are fixed by (seed, length, depth, index).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "One of the special magic numbers for {key} is: {value}. "
QUESTION = "What is the special magic number for {key}? The special magic number for {key} is: "
NEEDLES = ("passkey", "number", "uuid")
HAYSTACKS = ("noise", "corpus")
KEYS = ("apple", "river", "candle", "forest", "silver", "tiger", "piano", "lemon", "harbor", "violet", "rocket",
        "meadow", "copper", "falcon", "garden", "marble", "thunder", "willow", "anchor", "breeze")


@dataclass(frozen=True)
class Needle:
    """One needle's key and value, with the token ids of the needle sentence and of the question."""

    key: str
    value: str
    needle_ids: np.ndarray
    question_ids: np.ndarray


def make_needle(kind: str, tok, rng: random.Random, digits: int | None = None) -> Needle:
    """A needle of `kind` (one of NEEDLES) drawn from `rng`; `digits` overrides passkey's 5 / number's 7."""
    if kind not in NEEDLES:
        raise ValueError(f"--needle {kind}: choose one of {', '.join(NEEDLES)}")
    if kind == "passkey":
        key, value = "the passkey", _digits(rng, digits or 5)
    elif kind == "number":
        key, value = rng.choice(KEYS), _digits(rng, digits or 7)
    else:
        key, value = rng.choice(KEYS), str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return Needle(key, value, _ids(tok, NEEDLE.format(key=key, value=value)), _ids(tok, QUESTION.format(key=key)))


def make_needle_with_key(needle: Needle, key: str, tok) -> Needle:
    """The same value under another key."""
    return Needle(key, needle.value, _ids(tok, NEEDLE.format(key=key, value=needle.value)),
                  _ids(tok, QUESTION.format(key=key)))


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(n))


def _ids(tok, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text), dtype=np.int64)


def chance(kind: str, digits: int | None = None) -> float:
    """Probability of guessing the value exactly (uniform digits; a UUID is never guessed)."""
    if kind == "uuid":
        return 0.0
    return 10.0 ** -(digits or (5 if kind == "passkey" else 7))


# --- haystacks: callables (start, stop) -> token ids of that range, computed on demand -----------------------------


def noise_haystack(tok) -> Callable[[int, int], np.ndarray]:
    """The filler paragraph's ids repeated forever; any range is an index computation (no storage)."""
    period = _ids(tok, FILLER)

    def take(start: int, stop: int) -> np.ndarray:
        return period[np.arange(start, stop) % len(period)]

    take.period = len(period)  # needles go at whole repetitions of the paragraph
    return take


class CorpusHaystack:
    """Held-out documents of a prepared dataset, EOS between them, read forward shard by shard and cycled.

    Ranges must be asked for in increasing order within one sample (as `Sample.pieces` does); asking for an
    earlier start restarts the reading, so memory holds one shard's document at a time.
    """

    period = 1

    def __init__(self, data_path: str, split: str, eos_id: int):
        from titans_train.data.shards import Manifest, iter_shard

        self._shards = Manifest(data_path).shards(split)
        if not sum(s.tokens for s in self._shards):
            raise ValueError(f"--data {data_path}: split {split!r} holds no tokens for a corpus haystack")
        self._iter_shard, self._eos = iter_shard, eos_id
        self._restart()

    def _restart(self) -> None:
        self._docs, self._buf, self._buf_start = self._stream(), np.zeros(0, np.int64), 0

    def _stream(self) -> Iterator[np.ndarray]:
        while True:
            for shard in self._shards:
                for doc in self._iter_shard(shard):
                    yield np.append(doc.astype(np.int64), self._eos)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        if start < self._buf_start:
            self._restart()
        while self._buf_start + len(self._buf) < stop:  # drop what lies before `start`, append documents
            keep = self._buf[max(0, start - self._buf_start):]
            self._buf_start += len(self._buf) - len(keep)
            self._buf = np.concatenate([keep, next(self._docs)])
        off = start - self._buf_start
        return self._buf[off: off + stop - start]


# --- samples -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One (length, depth) prompt: `length` tokens = haystack with the needle at `insert`, then the question."""

    length: int
    depth: float
    needle: Needle
    haystack: Callable[[int, int], np.ndarray]
    insert: int

    @property
    def haystack_len(self) -> int:
        return self.length - len(self.needle.needle_ids) - len(self.needle.question_ids)

    def pieces(self, piece_len: int) -> Iterator[np.ndarray]:
        """The prompt's token ids in order, in pieces of at most `piece_len` (the question ends the last)."""
        n = self.needle
        parts: list[tuple[int, int, Callable | np.ndarray]] = [  # (start, stop, source) in prompt coordinates
            (0, self.insert, self.haystack),
            (self.insert, self.insert + len(n.needle_ids), n.needle_ids),
            (self.insert + len(n.needle_ids), self.length - len(n.question_ids), self.haystack),
            (self.length - len(n.question_ids), self.length, n.question_ids),
        ]
        buf, size = [], 0
        for start, stop, src in parts:
            pos = start
            while pos < stop:
                take = min(stop - pos, piece_len - size)
                if callable(src):  # haystack coordinates skip the needle
                    h = pos if pos < self.insert else pos - len(n.needle_ids)
                    buf.append(src(h, h + take))
                else:
                    buf.append(src[pos - start: pos - start + take])
                size, pos = size + take, pos + take
                if size == piece_len:
                    yield np.concatenate(buf)
                    buf, size = [], 0
        if size:
            yield np.concatenate(buf)

    def tokens(self) -> np.ndarray:
        """The whole prompt at once (tests and short prompts only)."""
        return np.concatenate(list(self.pieces(self.length)))


def make_sample(length: int, depth: float, needle: Needle, haystack) -> Sample:
    """Place the needle at `depth` (0 = first, 1 = just before the question) of a haystack filling `length`;
    a noise haystack keeps whole filler paragraphs on both sides. Too short a length is a ValueError."""
    prompt = len(needle.needle_ids) + len(needle.question_ids)
    if len(needle.needle_ids) >= length:
        raise ValueError(f"--lengths {length}: the needle ({len(needle.needle_ids)} tokens) is longer than the "
                         f"requested context; use lengths >= {prompt}")
    if length < prompt:
        raise ValueError(f"--lengths {length}: below the prompt, which is {prompt} tokens (needle "
                         f"{len(needle.needle_ids)} + question {len(needle.question_ids)}); use lengths >= {prompt}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"--depths {depth}: depths are fractions in [0, 1]")
    hay = length - prompt
    period = getattr(haystack, "period", 1)
    insert = min(int(round(depth * hay / period)) * period, hay // period * period)
    return Sample(length, depth, needle, haystack, insert)


def samples(lengths, depths, n: int, kind: str, tok, haystack, seed: int = 0,
            digits: int | None = None) -> Iterator[Sample]:
    """n samples per (length, depth), each needle from its own seeded RNG (reproducible in any order)."""
    for length in lengths:
        for depth in depths:
            for i in range(n):
                rng = random.Random(f"{seed}/{length}/{depth}/{i}")
                yield make_sample(length, depth, make_needle(kind, tok, rng, digits), haystack)


# --- scoring -------------------------------------------------------------------------------------------------------


def answer(model, sample: Sample, tok, piece_len: int = 1024, extra_tokens: int = 2) -> str:
    """The model's greedy continuation of the sample's prompt (as many tokens as the value has, plus a few),
    decoded. The prompt is streamed through the state piece by piece; only the last piece's logits are used."""
    import torch

    state, last = None, None
    with torch.no_grad():
        for piece in sample.pieces(piece_len):
            if last is not None:
                _, state = model(last, state)  # logits of all but the last piece are dropped at once
            last = torch.as_tensor(piece, dtype=torch.long)[None]  # (1, t)
        n_new = len(tok.encode(sample.needle.value)) + extra_tokens
        out = model.generate(last, n_new, temperature=0, state=state)
    return tok.decode(out[0, last.shape[1]:].tolist())


def correct(reply: str, value: str) -> bool:
    """Exact match: the reply starts with the value (leading whitespace ignored)."""
    return reply.lstrip().startswith(value)


def evaluate_niah(model, tok, lengths, depths, n: int, kind: str, haystack, *, seed: int = 0,
                  digits: int | None = None, piece_len: int = 1024, progress=None) -> dict:
    """Accuracy per (length, depth) over n samples each, and the tokens/s of the streaming. JSON-ready."""
    import time

    grid = {str(L): {str(d): 0 for d in depths} for L in lengths}
    replies, tokens, t0 = [], 0, time.perf_counter()
    for s in samples(lengths, depths, n, kind, tok, haystack, seed, digits):
        reply = answer(model, s, tok, piece_len)
        ok = correct(reply, s.needle.value)
        grid[str(s.length)][str(s.depth)] += ok
        tokens += s.length
        replies.append({"length": s.length, "depth": s.depth, "value": s.needle.value, "reply": reply, "correct": ok})
        if progress is not None:
            progress(s.length)
    seconds = time.perf_counter() - t0
    acc = {L: {d: c / n for d, c in row.items()} for L, row in grid.items()}
    return {"task": "niah", "needle": kind, "digits": digits, "lengths": list(lengths), "depths": list(depths),
            "samples": n, "seed": seed, "chance": chance(kind, digits), "accuracy": acc,
            "mean_accuracy": sum(sum(r.values()) for r in acc.values()) / (len(lengths) * len(depths)),
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9), "replies": replies}


# --- a synthetic training task: passkey documents for `titans-train prepare passkey:...` -------------------------

PASSKEY_DEFAULTS = {"docs": 20000, "digits": 1, "min_len": 256, "max_len": 2048}


def parse_passkey_spec(spec: str) -> dict:
    """`passkey` or `passkey:docs=20000,digits=1,min_len=256,max_len=2048` -> those settings (bytes of text)."""
    opts = dict(PASSKEY_DEFAULTS)
    body = spec.partition(":")[2]
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if key not in opts or not eq or not value.isdigit() or int(value) < 1:
            raise ValueError(f"source {spec}: {item!r} is not one of {', '.join(f'{k}=N' for k in opts)} (N >= 1)")
        opts[key] = int(value)
    shortest = len(NEEDLE.format(key="the passkey", value="0" * opts["digits"])) + len(QUESTION.format(key="the passkey"))
    if opts["min_len"] > opts["max_len"] or opts["min_len"] < shortest + opts["digits"]:
        raise ValueError(f"source {spec}: need {shortest + opts['digits']} <= min_len <= max_len (the prompt alone is "
                         f"{shortest} characters)")
    return opts


def passkey_document(i: int, digits: int, min_len: int, max_len: int, seed: int = 0) -> str:
    """Document i of the passkey task: a noise prompt of a seeded length in [min_len, max_len] characters (the
    answer included) with the needle at a seeded depth, then the answer and a newline. Byte tokens = characters."""
    rng = random.Random(f"passkey/{seed}/{i}")
    length = rng.randint(min_len, max_len)
    value = _digits(rng, digits)
    key = "the passkey"
    needle, question = NEEDLE.format(key=key, value=value), QUESTION.format(key=key)
    hay = length - len(needle) - len(question) - len(value) - 1
    filler = (FILLER * (hay // len(FILLER) + 1))[:hay]
    cut = int(rng.random() * (hay // len(FILLER) + 1)) * len(FILLER)
    cut = min(cut, hay // len(FILLER) * len(FILLER))
    return filler[:cut] + needle + filler[cut:] + question + value + "\n"
