"""AdamW with no decay on norms, biases and embeddings, and a linear-warmup-then-cosine learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; biases, norm scales, embeddings and other 0/1-d tensors do not.

    Embeddings are found by module type (`nn.Embedding`) so that a tied output head, which shares the
    embedding's tensor, is not decayed either. Learned memory initial weights (`W_0`) are matrices and decay.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
        elif "norm" in type(module).__name__.lower():
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, other, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or id(p) in no_decay or name.endswith(".bias"):
            other.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]


class WarmupCosine:
    """lr multiplier: linear from 1/warmup to 1 over `warmup` steps, then cosine down to `min_ratio` at `total`.

    A callable object (not a lambda) so that LambdaLR's state_dict stays plain data.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, max(total, 1), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW + LambdaLR(WarmupCosine) from the recipe's `optim` section; `total` is the trainer's max_steps."""
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=None,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.warmup_steps, cfg.decay_steps, cfg.min_lr_ratio))
    return opt, sched
