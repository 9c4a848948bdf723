"""Tiny real Titans models for the training tests (a few thousand parameters, fast on CPU)."""

from __future__ import annotations


def tiny_model_config(variant: str, **over):
    from titans_train.config import MemoryConfig, ModelConfig

    kw = dict(variant=variant, vocab_size=17, dim=16, n_layers=2, heads=2, max_seq_len=16, window=6, n_persistent=2,
              segment_len=8, mac_memory_tokens=4, memory=MemoryConfig(chunk_size=4))
    kw.update(over)
    return ModelConfig(**kw)


def tiny_titans(variant: str, **over):
    from titans_train.models import build_model

    return build_model(tiny_model_config(variant, **over))
