"""The Triton kernels of the memory op (impl="triton") against the token-loop reference.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py before the kernels are
imported) on CPU tensors: float64 to the reference's 1e-9, outputs, final state and every gradient. The interpreter
executes every block operation in numpy, so shapes are small (one batch row, two heads, D = 8 padded to 16 columns,
hidden 32, a few chunks); they still cover partial chunks, chunks shorter than the 16-row block, several state tiles
(hidden 32 = two tiles of 16), all four output forms, L = 1..3, per-layer theta and checkpoint segments. On a GPU
the `gpu` tests run the compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.test_ops_memory import TOL, compare, make_inputs, run_with_grads
from titans_train.ops import memory_update, memory_update_reference

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] brings it)")
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the interpreter is off (a GPU is present: the gpu tests run the kernels)")
BH = (1, 2)  # batch, heads: two programs, so per-item offsets are exercised


@pytest.fixture(autouse=True)
def _debug_checks():
    from titans_train.ops import debug_checks

    with debug_checks(True):
        yield


@interpreted
@pytest.mark.parametrize(
    "T,chunk_size,n_layers,residual,layer_norm",
    [
        (21, 4, 2, True, True),  # 6 chunks, the last one partial
        (21, 4, 1, False, False),
        (21, 4, 3, False, True),
        (21, 4, 2, True, False),
        (19, 16, 2, True, True),  # a full 16-row block, then a partial chunk
        (7, 1, 2, True, True),  # one token per chunk in a 16-row block
        (5, 16, 3, True, True),  # T shorter than one chunk
    ],
    ids=["chunk4-L2-res+ln", "chunk4-L1-plain", "chunk4-L3-ln", "chunk4-L2-res", "chunk16-L2", "chunk1-L2",
         "T5-chunk16-L3"],
)
def test_triton_matches_reference(T, chunk_size, n_layers, residual, layer_norm):
    compare(T, chunk_size, n_layers, residual, layer_norm, impl="triton", batch_heads=BH)


@interpreted
def test_triton_per_layer_theta():
    compare(21, 4, 2, True, True, per_layer_theta=True, impl="triton", batch_heads=BH)


@interpreted
def test_triton_ln_eps():
    compare(21, 4, 2, True, True, impl="triton", batch_heads=BH, ln_eps=0.5)


@interpreted
@pytest.mark.parametrize("n_layers,forget_to", [(1, True), (2, True), (3, True), (2, "shared")],
                         ids=["L1", "L2", "L3", "L2-shared"])
def test_triton_forget_to(n_layers, forget_to):
    """The decay target (forget_to): query reads, chunk-end state and its own gradient, through both kernels; also
    one target shared by the batch rows."""
    compare(21, 4, n_layers, True, True, impl="triton", batch_heads=(2, 2) if forget_to == "shared" else BH,
            forget_to=forget_to)


@interpreted
@pytest.mark.parametrize("segment", [1, 4], ids=["segment1", "segment4-of-6"])
def test_triton_checkpoint_segments(segment, monkeypatch):
    """The backward recomputes anchors from one stored state per segment of chunks: a segment of one chunk, and one
    that does not divide the 6 chunks, give the reference's results (the default, 8, covers all 6 in one)."""
    from titans_train.ops.neural_memory import triton_kernel

    monkeypatch.setattr(triton_kernel, "SEGMENT", segment)
    compare(21, 4, 2, True, True, impl="triton", batch_heads=BH)


@interpreted
def test_triton_without_state_gradient_and_no_grad():
    """Only y feeds the loss (no gradient arrives for the final state); under no_grad (no checkpoints kept) the
    output is the same bit for bit."""
    args, leaves = make_inputs(13, 2, batch_heads=BH)
    y_t = memory_update(*args, chunk_size=4, impl="triton")[0]
    g_t = torch.autograd.grad(y_t.square().sum(), leaves)
    y_r = memory_update_reference(*args, chunk_size=4)[0]
    g_r = torch.autograd.grad(y_r.square().sum(), leaves)
    assert (y_t - y_r).abs().max() <= TOL
    for a, b in zip(g_t, g_r):
        assert (a - b).abs().max() <= TOL
    with torch.no_grad():
        y_n = memory_update(*args, chunk_size=4, impl="triton")[0]
    assert torch.equal(y_n, y_t.detach())


@interpreted
def test_triton_float32_close_to_autograd():
    """float32, held to the tolerances of the CPU kernel's float32 test."""
    args, leaves = make_inputs(37, 2, dtype=torch.float32, batch_heads=BH)
    f = run_with_grads(memory_update, args, leaves, chunk_size=16, impl="triton")
    a = run_with_grads(memory_update, args, leaves, chunk_size=16, impl="autograd")
    torch.testing.assert_close(f[0], a[0], rtol=1e-4, atol=1e-5)
    for gf, ga in zip(f[3], a[3]):
        torch.testing.assert_close(gf, ga, rtol=1e-3, atol=1e-4)


def test_triton_refuses_what_it_does_not_run():
    """One-line ValueErrors for channel-wise alpha, more than 3 layers, unequal hidden widths, reduced precision."""
    from titans_train.ops.neural_memory.chunk import choose_impl

    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="impl='triton' does not support channel-wise alpha"):
        choose_impl("triton", False, 16, q, channel_alpha=True, dims=[8, 32, 8])
    with pytest.raises(ValueError, match=r"1\.\.3 memory layers, got len\(weights\)=4"):
        choose_impl("triton", False, 16, q, dims=[8, 32, 32, 32, 8])
    with pytest.raises(ValueError, match="one hidden width"):
        choose_impl("triton", False, 16, q, dims=[8, 32, 16, 8])
    with pytest.raises(ValueError, match="float32/float64"):
        choose_impl("triton", False, 16, q.half(), dims=[8, 32, 8])
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert choose_impl("triton", False, 16, q, dims=[8, 32, 8]) == "triton"
    assert choose_impl("auto", False, 16, q, dims=[8, 32, 8]) != "triton"  # "auto" takes it on CUDA only


@pytest.mark.gpu
@pytest.mark.parametrize("n_layers,chunk_size,forget_to", [(2, 16, False), (1, 32, False), (2, 16, True)],
                         ids=["L2-chunk16", "L1-chunk32", "L2-chunk16-forget_to"])
def test_triton_gpu_matches_reference(n_layers, chunk_size, forget_to):
    """The compiled kernels on the GPU (exact fp32 matmuls: TF32 off) against the float64 reference on the CPU."""
    args, leaves = make_inputs(100, n_layers)
    dev = [a.detach().cuda().float() if torch.is_tensor(a) else tuple(x.detach().cuda().float() for x in a)
           for a in args]
    leaves_gpu = [a.requires_grad_() for a in dev[:6]] + [w.requires_grad_() for w in dev[6]] + [
        s.requires_grad_() for s in dev[7]]
    kw_ref, kw_gpu = {}, {}
    if forget_to:  # decay towards other weights than the state's, with their own gradient
        target = tuple((0.5 * w.detach()).requires_grad_() for w in args[6])
        kw_ref["forget_to"], leaves = target, [*leaves, *target]
        kw_gpu["forget_to"] = tuple(t.detach().cuda().float().requires_grad_() for t in target)
        leaves_gpu = [*leaves_gpu, *kw_gpu["forget_to"]]
    ref = run_with_grads(memory_update_reference, args, leaves, chunk_size=chunk_size, **kw_ref)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fast = run_with_grads(memory_update, dev, leaves_gpu, chunk_size=chunk_size, impl="triton", **kw_gpu)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(fast[0].cpu().double(), ref[0], rtol=1e-4, atol=1e-5)
    for gf, gr in zip(fast[3], ref[3]):
        torch.testing.assert_close(gf.cpu().double(), gr, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_triton_gpu_bf16_autocast_runs_fp32_state():
    """Under bf16 autocast "auto" picks the kernels on CUDA; the state stays fp32 and close to the fp32 result."""
    from titans_train.ops.neural_memory.chunk import choose_impl

    args, _ = make_inputs(256, 2, dtype=torch.float32)
    dev = [a.detach().cuda() if torch.is_tensor(a) else tuple(x.detach().cuda() for x in a) for a in args]
    assert choose_impl("auto", False, 16, dev[0], dims=[8, 32, 8]) == "triton"
    assert choose_impl("auto", False, 64, dev[0], dims=[8, 32, 8]) == "autograd"  # over MAX_GPU_CHUNK
    with pytest.raises(ValueError, match="up to 32 tokens on GPUs"):
        choose_impl("triton", False, 64, dev[0], dims=[8, 32, 8])
    y32, W32, _ = memory_update(*dev, chunk_size=16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16, W16, S16 = memory_update(*dev, chunk_size=16)
    assert W16[0].dtype == torch.float32 and S16[0].dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=1e-2, atol=1e-2)
