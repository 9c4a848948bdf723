"""The memory helps where attention cannot reach: associative recall with the facts beyond the attention window.

Vocabulary: 8 keys, 8 values, 16 fillers and 64 fact tokens, one per (key, value). A sequence states 4 facts (a
fact token, then a filler), then 12 fillers, then asks the 4 keys in random order, each followed by its value:

    [f(k1,v1) _ f(k2,v2) _ ... f(k4,v4) _] [_ x 12] [k3 v3 k1 v1 k4 v4 k2 v2]

The loss and the accuracy are taken where a query key must predict its value (chance: 1/8). With a sliding
window of 4 and 2 layers attention reaches back at most 6 tokens, and the nearest fact is 14 tokens before the
first query, so a sliding-window Transformer++ can only guess; a model whose memory stores the facts can answer.
"""

import torch
import torch.nn.functional as F

from titans_train.config import ModelConfig
from titans_train.models import build_model

KEYS = VALUES = 8
FILLERS = 16
FACTS, GAP = 4, 12
VOCAB = KEYS + VALUES + FILLERS + KEYS * VALUES
CHANCE = 1 / VALUES


def recall_batch(batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences (batch, 2*FACTS + GAP + 2*FACTS) and the positions of the query keys."""
    keys = torch.stack([torch.randperm(KEYS, generator=g)[:FACTS] for _ in range(batch)])  # (B, FACTS)
    values = torch.randint(0, VALUES, (batch, FACTS), generator=g)
    filler = lambda n: torch.randint(KEYS + VALUES, KEYS + VALUES + FILLERS, (batch, n), generator=g)  # noqa: E731
    facts = KEYS + VALUES + FILLERS + keys * VALUES + values
    stated = torch.stack([facts, filler(FACTS)], dim=-1).flatten(1)  # (B, 2*FACTS)
    order = torch.stack([torch.randperm(FACTS, generator=g) for _ in range(batch)])
    asked = torch.stack([keys.gather(1, order), KEYS + values.gather(1, order)], dim=-1).flatten(1)
    seq = torch.cat([stated, filler(GAP), asked], dim=1)
    query_pos = torch.arange(2 * FACTS + GAP, seq.shape[1], 2)
    return seq, query_pos


def train_recall(variant: str, steps: int, seed: int = 0) -> float:
    """Train a 2-block dim-96 model of `variant` for `steps` AdamW steps; accuracy on 256 fresh sequences."""
    torch.manual_seed(seed)
    cfg = ModelConfig(variant=variant, vocab_size=VOCAB, dim=96, n_layers=2, heads=4, max_seq_len=64, window=4,
                      n_persistent=4, memory=dict(chunk_size=8))
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        seq, pos = recall_batch(16, g)
        logits, _ = model(seq[:, :-1])
        loss = F.cross_entropy(logits[:, pos].flatten(0, 1), seq[:, pos + 1].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    seq, pos = recall_batch(256, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        logits, _ = model(seq[:, :-1])
    return (logits[:, pos].argmax(-1) == seq[:, pos + 1]).float().mean().item()


def test_recall_task_needs_more_than_the_window():
    seq, pos = recall_batch(4, torch.Generator().manual_seed(0))
    nearest_fact = 2 * (FACTS - 1)
    reach = 2 * (4 - 1)  # 2 layers of window 4
    assert int(pos[0]) - nearest_fact > reach
    assert seq.shape == (4, 2 * FACTS + GAP + 2 * FACTS) and int(seq.max()) < VOCAB


def test_memory_recalls_beyond_the_window_and_attention_does_not():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on 2 shared cores
    try:
        # LMM learns the task later than MAG and when depends on float rounding: at 250 steps seeds 0/1/2 gave
        # 0.85/0.56/0.99 with the op's autograd path and 0.33/0.77/0.96 with its CPU kernel (both exact to 1e-9 in
        # float64); at 400 steps the kernel gave 0.58/0.99/0.98 (seeds 0/1/3).
        acc = {v: train_recall(v, steps) for v, steps in (("lmm", 400), ("mag", 200), ("transformer", 250))}
    finally:
        torch.set_num_threads(threads)
    print(f"recall accuracy (chance {CHANCE:.3f}): {acc}")
    assert acc["lmm"] >= 3 * CHANCE, acc
    assert acc["mag"] >= 3 * CHANCE, acc
    assert acc["transformer"] <= 1.6 * CHANCE, acc
