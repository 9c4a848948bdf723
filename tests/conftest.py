import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests where no CUDA device exists, and `slow` ones unless asked for with -m slow."""
    has_gpu = torch.cuda.is_available()
    selected = config.getoption("-m") or ""
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slow" in item.keywords and "slow" not in selected:
            item.add_marker(pytest.mark.skip(reason="slow: run with -m slow"))

# Without a GPU, Triton kernels (the memory op's impl="triton") run under Triton's interpreter on CPU tensors, which is
# how tests/test_ops_memory_triton.py checks them. The switch is read when a kernel is decorated, i.e. when
# titans_train/ops/neural_memory/triton_kernel.py is first imported, so it is set here, before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
