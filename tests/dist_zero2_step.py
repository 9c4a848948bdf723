"""ZeRO-2 optimiser steps of the tiny model with DeepSpeed's CPU accelerator, outside Lightning, and a checkpoint.

Run by tests/test_dist_strategies.py::test_zero2_cpu_step under `torchrun --nproc-per-node 2` with
DS_ACCELERATOR=cpu (a child process of the test, never a pytest session):

    dist_zero2_step.py OUT_DIR RECIPE [key=value ...]

The DeepSpeed config is the one `trainer.strategy=deepspeed_stage_2` derives from the recipe; the window goes
through the same truncated backprop as `fit`. The model sits under `.model` as in the LightningModule, so
parameter names are the ones Lightning's DeepSpeed checkpoints hold. After three steps the engine writes
OUT_DIR/step-000000003.ckpt as Lightning's DeepSpeedStrategy does (`engine.save_checkpoint`, tag "checkpoint",
our entry in the client state); rank 0 saves the engine's weights to OUT_DIR/engine_weights.pt and prints one JSON
line: losses, the gradient norm, the world size.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
from torch import nn

from titans_train.config import load
from titans_train.models import build_model
from titans_train.train.module import CKPT_KEY
from titans_train.train.strategies import deepspeed_config
from titans_train.train.tbptt import window_step


class Lit(nn.Module):
    """The LightningModule's naming (`model.*`) without Lightning."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, state=None):
        return self.model(tokens, state)


out = Path(sys.argv[1])
recipe, resolved = load(sys.argv[2], sys.argv[3:])
torch.manual_seed(0)
model = Lit(build_model(recipe.model))
cfg = deepspeed_config(recipe, precision="32-true")
cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}}
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
assert engine.zero_optimization_stage() == 2
g = torch.Generator().manual_seed(1)  # the same batch on every rank: the loss must fall
n = recipe.data.n_chunks * recipe.data.chunk_len + 1
tokens = torch.randint(0, recipe.model.vocab_size, (recipe.data.batch_size, n), generator=g)
losses = []
for _ in range(3):
    chunk = window_step(engine, tokens, None, chunk_len=recipe.data.chunk_len, tbptt_chunks=recipe.data.n_chunks,
                        backward=engine.backward)
    engine.step()
    losses.append(float(chunk.mean()))
engine.save_checkpoint(str(out / "step-000000003.ckpt"), client_state={CKPT_KEY: {"recipe": resolved}},
                       tag="checkpoint")
if torch.distributed.get_rank() == 0:
    torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, out / "engine_weights.pt")
    print(json.dumps({"losses": losses, "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                      "world": torch.distributed.get_world_size()}), flush=True)
