"""Tokenizers: byte-level (the default, no files), any Hugging Face `tokenizers` JSON file, and a byte-level BPE
trained on the corpus. Each has a fingerprint (sha256 of its serialized form) that the manifest records, so a
loader can refuse shards made with another tokenizer than the recipe's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from titans_train.cli import UserError

EOS_TOKEN = "<|eos|>"
# Names an EOS token goes by in common tokenizer.json files, tried in order when none is given.
EOS_CANDIDATES = (EOS_TOKEN, "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
UINT16_LIMIT = 1 << 16


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then EOS = 256. Lossless for any text; needs no files."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256
    eos_token = EOS_TOKEN
    path = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")

    def serialize(self) -> str:
        return json.dumps({"kind": "byte", "bytes": 256, "specials": [EOS_TOKEN]}, sort_keys=True)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.serialize().encode()).hexdigest()


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (e.g. Llama-2's `tokenizer.json`, or one trained by prepare)."""

    kind = "hf"

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer

        self.path = str(path)
        if not Path(path).is_file():
            raise UserError(f"tokenizer file {path} does not exist: give a tokenizer.json path or `byte`")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise UserError(f"{path} is not a Hugging Face tokenizers JSON file ({e}); give a tokenizer.json") from e
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        names = (eos_token,) if eos_token else EOS_CANDIDATES
        ids = [(n, self.tok.token_to_id(n)) for n in names]
        found = [(n, i) for n, i in ids if i is not None]
        if not found:
            raise UserError(
                f"{path}: no EOS token among {', '.join(names)}; name the tokenizer's end-of-text token with "
                "--eos-token TOKEN"
            )
        self.eos_token, self.eos_id = found[0]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def serialize(self) -> str:
        return self.tok.to_str()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.serialize().encode()).hexdigest()


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
    """`byte` -> ByteTokenizer; anything else is a path to a tokenizers JSON file."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token=eos_token)


def tokenizer_record(tok: Tokenizer, path_in_manifest: str | None = None) -> dict:
    """What the manifest says about a tokenizer."""
    return {
        "kind": tok.kind,
        "path": path_in_manifest if path_in_manifest is not None else tok.path,
        "fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "eos_token": tok.eos_token,
    }


def storage_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits, else uint32; asking for uint16 with a larger vocab is an error."""
    if requested not in ("auto", "uint16", "uint32"):
        raise UserError(f"--dtype {requested}: choose auto, uint16 or uint32")
    if requested == "uint16" and vocab_size > UINT16_LIMIT:
        raise UserError(
            f"--dtype uint16 cannot store a vocabulary of {vocab_size} tokens (ids up to {vocab_size - 1} > 65535): "
            "use --dtype uint32 or auto"
        )
    if requested == "auto":
        requested = "uint16" if vocab_size <= UINT16_LIMIT else "uint32"
    return np.dtype(requested)


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> HFTokenizer:
    """Train a byte-level BPE (lossless: every byte is in the alphabet) with EOS as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise UserError(f"--train-tokenizer {vocab_size}: the vocabulary needs more than 257 tokens (256 bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(out)
    return HFTokenizer(out, eos_token=EOS_TOKEN)
