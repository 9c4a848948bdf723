"""Whole networks: LMM, MAC, MAG, MAL and Transformer++ (`build_model`), their streaming `State`, counting.

Names are imported on first use, so `titans_train.models.info` (the `info` subcommand) loads without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "State": "lm", "TitansLM": "lm", "build_model": "lm", "sample": "lm",
    "count_params": "counting", "flops_per_token": "counting",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"titans_train.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'titans_train.models' has no attribute {name!r}")
