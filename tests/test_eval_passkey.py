"""Passkey retrieval beyond the training length: tiny LMM and MAG trained at <= 2048 tokens on the niah prompt
format (one-digit passkey, noise haystack; chance 0.1) retrieve the passkey at 32K tokens, streamed through the
state, while a sliding-window Transformer++ of the same size stays near chance. Minutes: marked slow
(`pytest -m slow tests/test_eval_passkey.py`); the measured numbers, per training seed, are in BENCHMARKS.md
("Passkey retrieval"). What decides retrieval at 32K is the forgetting gate's horizon, not the write strength:
with alpha_bias -9 (alpha ~1.2e-4 per token at init, a ~8K-token horizon) only exp(-4) ~ 2% of the needle's write
is left after 32K tokens, and accuracy at 32K was a matter of the training seed (MAG 0.90 / 0.25 / 0.30 / 0.20 over
seeds and code versions); with alpha_bias -14 (~8e-7 at init, a ~1.2M-token horizon) 97% is left. Prompts of up
to 2048 tokens in training (at equal tokens per step) then made LMM retrieve at 32K on every seed tried."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from titans_train.config import ModelConfig
from titans_train.data.tokenizer import ByteTokenizer
from titans_train.eval import niah as N
from titans_train.models import build_model

TOK = ByteTokenizer()
LENGTHS = (256, 512, 1024, 2048)  # training prompt lengths (tokens), drawn per step
TOKENS_PER_STEP = 8192  # rows per step = TOKENS_PER_STEP // length (32 at 256, 4 at 2048)
CHANCE = N.chance("passkey", 1)


def passkey_model(variant: str) -> torch.nn.Module:
    """2 blocks, dim 64, window 64 (attention reaches 128 tokens back; the prompt alone is 151): the sizes of
    recipes/tiny_niah_*.yaml. alpha_bias -14: forgetting ~8e-7 per token (a passkey task needs none)."""
    cfg = ModelConfig(variant=variant, vocab_size=TOK.vocab_size, dim=64, n_layers=2, heads=2, max_seq_len=512,
                      window=64, n_persistent=4, memory=dict(alpha_bias=-14.0, theta_bias=-2.0))
    return build_model(cfg)


def batch(rng: random.Random, size: int, length: int) -> torch.Tensor:
    """Prompts of `length` tokens with the needle at a random depth, each followed by its one-digit answer."""
    hay = N.noise_haystack(TOK)
    rows = []
    for _ in range(size):
        needle = N.make_needle("passkey", TOK, rng, digits=1)
        rows.append(np.concatenate([N.make_sample(length, rng.random(), needle, hay).tokens(),
                                    TOK.encode(needle.value)]))
    return torch.as_tensor(np.stack(rows))  # (size, length + 1)


def train_passkey(variant: str, steps: int, seed: int = 0, lm_weight: float = 0.2):
    """AdamW on the answer token's loss plus `lm_weight` x the loss on every token; 8,192 tokens per step at every
    prompt length (with prompts to 2048 LMM retrieved at 32K on every seed tried, BENCHMARKS.md)."""
    torch.manual_seed(seed)
    model = passkey_model(variant)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    for _ in range(steps):
        length = rng.choice(LENGTHS)
        x = batch(rng, TOKENS_PER_STEP // length, length)
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits[:, length - 1], x[:, length])
        loss = loss + lm_weight * F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def accuracy(model, length: int, n: int = 20) -> float:
    r = N.evaluate_niah(model, TOK, [length], [0.0, 0.25, 0.5, 0.75, 1.0], n // 5, "passkey", N.noise_haystack(TOK),
                        seed=1, digits=1, piece_len=1024)
    return r["mean_accuracy"]


@pytest.mark.slow
def test_memory_retrieves_a_passkey_at_32k_and_sliding_window_attention_does_not():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        acc = {}
        for variant, steps in (("mag", 300), ("lmm", 300), ("transformer", 300)):
            model = train_passkey(variant, steps)
            acc[variant] = {L: accuracy(model, L) for L in (512, 32768)}
    finally:
        torch.set_num_threads(threads)
    print(f"passkey accuracy (chance {CHANCE}): {acc}")
    assert acc["mag"][32768] >= 0.5, acc
    assert acc["lmm"][32768] >= 0.5, acc
    assert acc["transformer"][32768] <= 3 * CHANCE, acc
