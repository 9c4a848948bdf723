"""Needle in a haystack: prompts built lazily in pieces equal the prompt built at once; the streamed greedy
answer equals generation from one full forward; the haystack generator's memory does not grow with the length."""

import random
import tracemalloc

import numpy as np
import pytest
import torch

from tests.train_models import tiny_titans
from titans_train.data.tokenizer import ByteTokenizer
from titans_train.eval import niah as N

TOK = ByteTokenizer()


def reference_prompt(s: N.Sample) -> np.ndarray:
    """haystack[:insert] + needle + haystack[insert:] + question, from one long haystack array."""
    hay = np.frombuffer((N.FILLER * (s.haystack_len // len(N.FILLER) + 1)).encode(), np.uint8).astype(np.int64)
    hay = hay[: s.haystack_len]
    return np.concatenate([hay[: s.insert], s.needle.needle_ids, hay[s.insert:], s.needle.question_ids])


@pytest.mark.parametrize("kind", N.NEEDLES)
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_pieces_equal_the_whole_prompt(kind, depth):
    needle = N.make_needle(kind, TOK, random.Random(3))
    s = N.make_sample(1000, depth, needle, N.noise_haystack(TOK))
    ref = reference_prompt(s)
    assert len(ref) == 1000 and s.insert % len(N.FILLER) == 0
    assert abs(s.insert - depth * s.haystack_len) <= len(N.FILLER)
    for piece_len in (7, 100, 1000, 4096):
        pieces = list(s.pieces(piece_len))
        assert all(len(p) <= piece_len for p in pieces) and all(len(p) == piece_len for p in pieces[:-1])
        assert np.array_equal(np.concatenate(pieces), ref)
    text = TOK.decode(ref)
    assert N.NEEDLE.format(key=needle.key, value=needle.value) in text
    assert text.endswith(N.QUESTION.format(key=needle.key))


def test_needles_are_seeded_and_of_their_kind():
    a = list(N.samples([300], [0.5], 3, "number", TOK, N.noise_haystack(TOK), seed=1))
    b = list(N.samples([300], [0.5], 3, "number", TOK, N.noise_haystack(TOK), seed=1))
    assert [s.needle.value for s in a] == [s.needle.value for s in b]
    assert all(len(s.needle.value) == 7 and s.needle.value.isdigit() for s in a)
    assert len(N.make_needle("uuid", TOK, random.Random(0)).value) == 36
    assert N.make_needle("passkey", TOK, random.Random(0), digits=1).value.isdigit()
    assert N.chance("passkey", 1) == 0.1 and N.chance("number") == 1e-7


def test_streamed_answer_equals_full_forward_generation():
    torch.manual_seed(0)
    model = tiny_titans("mag", vocab_size=257).double().eval()
    s = N.make_sample(400, 0.5, N.make_needle("passkey", TOK, random.Random(0)), N.noise_haystack(TOK))
    streamed = N.answer(model, s, TOK, piece_len=37)
    with torch.no_grad():
        out = model.generate(torch.as_tensor(s.tokens())[None], len(s.needle.value) + 2, temperature=0)
    assert streamed == TOK.decode(out[0, 400:].tolist())
    assert N.correct(" 123.", "123") and not N.correct("12", "123")


def test_haystack_memory_does_not_grow_with_length():
    def peak(length):
        s = N.make_sample(length, 0.5, N.make_needle("passkey", TOK, random.Random(0)), N.noise_haystack(TOK))
        tracemalloc.start()
        n = sum(len(p) for p in s.pieces(1024))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert n == length
        return top

    small, large = peak(16_384), peak(1 << 21)
    assert large < small * 1.5 + 65536, (small, large)  # a (2M,) int64 array alone would be 16 MiB


def test_corpus_haystack_reads_documents_in_order(tmp_path):
    from titans_train.data.shards import Manifest, SplitWriter, write_json_atomic, FORMAT
    from titans_train.data.tokenizer import tokenizer_record

    docs = [np.arange(i * 10, i * 10 + 5 + i, dtype=np.uint16) for i in range(6)]
    w = SplitWriter(tmp_path, "validation", 200, np.uint16)
    for d in docs:
        w.add(d)
    split = w.close()
    write_json_atomic(tmp_path / "manifest.json", {"format": FORMAT, "version": 1, "dtype": "uint16",
                                                    "tokenizer": tokenizer_record(TOK), "splits": {"validation": split}})
    assert Manifest(tmp_path).shards("validation")
    hay = N.CorpusHaystack(str(tmp_path), "validation", eos_id=256)
    stream = np.concatenate([np.append(d.astype(np.int64), 256) for d in docs] * 3)
    got = np.concatenate([hay(a, b) for a, b in [(0, 7), (7, 40), (40, 41), (41, 130)]])
    assert np.array_equal(got, stream[:130])
    assert np.array_equal(hay(3, 9), stream[3:9])  # an earlier start reads from the beginning again


def test_lengths_below_the_prompt_are_errors():
    needle = N.make_needle("uuid", TOK, random.Random(0))
    prompt = len(needle.needle_ids) + len(needle.question_ids)
    with pytest.raises(ValueError, match="below the prompt"):
        N.make_sample(prompt - 1, 0.5, needle, N.noise_haystack(TOK))
    assert N.make_sample(prompt, 0.5, needle, N.noise_haystack(TOK)).haystack_len == 0


def test_passkey_documents_are_niah_prompts_with_their_answer():
    opts = N.parse_passkey_spec("passkey:docs=50,digits=2,min_len=300,max_len=900")
    assert opts == {"docs": 50, "digits": 2, "min_len": 300, "max_len": 900}
    for i in range(20):
        doc = N.passkey_document(i, 2, 300, 900)
        assert 300 <= len(doc) <= 900 and doc == N.passkey_document(i, 2, 300, 900)
        prompt, value = doc[:-3], doc[-3:-1]
        assert value.isdigit() and doc.endswith("\n")
        assert prompt.endswith(N.QUESTION.format(key="the passkey"))
        assert N.NEEDLE.format(key="the passkey", value=value) in prompt
        hay = prompt.replace(N.NEEDLE.format(key="the passkey", value=value), "", 1)
        assert prompt.index(N.NEEDLE[:10]) % len(N.FILLER) == 0  # at a paragraph boundary, as make_sample puts it
        assert hay.startswith(N.FILLER[: min(20, len(hay))]) or hay.startswith(N.QUESTION[:10])
    for bad in ("passkey:docs=0", "passkey:size=3", "passkey:min_len=10", "passkey:min_len=900,max_len=800"):
        with pytest.raises(ValueError, match="source passkey"):
            N.parse_passkey_spec(bad)
