"""One ZeRO-2 optimiser step of the tiny model with DeepSpeed's CPU accelerator, outside Lightning.

Run by tests/test_dist_strategies.py::test_zero2_cpu_step under `torchrun --nproc-per-node 2` with
DS_ACCELERATOR=cpu (a child process of the test, never a pytest session). The DeepSpeed config is the one
`trainer.strategy=deepspeed_stage_2` derives from the recipe; the window goes through the same truncated
backprop as `fit`. Rank 0 prints one JSON line: losses before/after two steps and the gradient norm.
"""

import json
import sys

import deepspeed
import torch

from titans_train.config import load
from titans_train.models import build_model
from titans_train.train.strategies import deepspeed_config
from titans_train.train.tbptt import window_step

recipe, _ = load(sys.argv[1], sys.argv[2:])
torch.manual_seed(0)
model = build_model(recipe.model)
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
if torch.distributed.get_rank() == 0:
    print(json.dumps({"losses": losses, "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                      "world": torch.distributed.get_world_size()}), flush=True)
