"""Forward + backward time of each stage of one NeuralMemory layer, fused CPU kernels on and off, interleaved.

The stages of `NeuralMemory.forward` as it runs them: the qkv projection, the causal conv + SiLU, the per-head
q / k / v norms, the rate maps, the memory op (its coefficient prep and kernel), and the read-out (per-head RMS
norm, SiLU gate, output projection). Each stage is timed alone on its own inputs (forward, then backward of a
random cotangent), best of `--rounds`, with `titans_train.ops.fused`'s kernels off (the same math as PyTorch ops)
and on. Batch 1, the benchmarks' layer (dim 256, 4 heads of 64, memory chunk 16, the layer's defaults).

    python benchmarks/memory_layer_stages.py --T 8192 --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from titans_train.cli import cpu_runtime_defaults, flush_denormals  # noqa: E402

cpu_runtime_defaults(training=True)

import torch  # noqa: E402

from titans_train.layers.neural_memory import NeuralMemory  # noqa: E402
from titans_train.ops import fused, memory_update  # noqa: E402


def stages(layer: NeuralMemory, x: torch.Tensor):
    """(name, function, its inputs) in forward order; each stage's inputs are the previous stages' outputs."""
    state = layer.init_state(x.shape[0])
    kw = layer._op_kw(x.device, x.dtype)
    modes = ("l2", "l2", "rms" if layer.value_norm else None)
    with torch.no_grad():
        proj = layer.qkv(x)
        qkv = layer._causal_conv(proj, state.conv_tail, slice(None))[0]
        q, k, v = fused.head_norms(qkv, layer.heads, modes)  # the op reads them in the layout each path gives
        theta, eta, alpha = layer._rates(x)
        theta = theta if layer.theta_cols > 1 else theta[..., 0]
        y = memory_update(q, k, v, theta, eta, alpha, state.weights, state.momentum, **kw)[0]
    return [
        ("qkv projection", lambda x: layer.qkv(x), (x,)),
        ("conv + SiLU", lambda p: layer._causal_conv(p, state.conv_tail, slice(None))[0], (proj,)),
        ("q / k / v head norms", lambda t: fused.head_norms(t, layer.heads, modes), (qkv,)),
        ("rates", lambda x: layer._rates(x), (x,)),
        ("memory op", lambda q, k, v, th, e, a: memory_update(q, k, v, th, e, a, state.weights, state.momentum,
                                                              **kw)[0], (q, k, v, theta, eta, alpha)),
        ("read-out (norm, gate, projection)", lambda y, x: layer._output(y, x), (y, x)),
    ]


def timed(fn, inputs) -> float:
    leaves = [t.detach().requires_grad_() for t in inputs]
    t0 = time.perf_counter()
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    flush_denormals()
    if not fused.available():
        sys.exit(f"the fused kernels did not build: {fused._KERNEL.error}")
    torch.manual_seed(0)
    layer = NeuralMemory(256, 4)
    x = torch.randn(1, args.T, 256)
    build = fused._KERNEL.module
    work = {}
    for mode in ("off", "on"):
        fused._KERNEL.module = build if mode == "on" else (lambda: None)
        work[mode] = stages(layer, x)
    names = [name for name, _, _ in work["on"]]
    print(f"NeuralMemory(256, 4) T={args.T} threads={args.threads} load {os.getloadavg()}", flush=True)
    best = {(name, mode): float("inf") for name in names for mode in ("off", "on")}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            fused._KERNEL.module = build if mode == "on" else (lambda: None)
            for name, fn, inputs in work[mode]:
                best[name, mode] = min(best[name, mode], timed(fn, inputs))
    fused._KERNEL.module = build
    total = {mode: sum(best[name, mode] for name in names) for mode in ("off", "on")}
    print(f"{'stage':36s} {'fused off':>16s} {'fused on':>16s}")
    for name in names:
        off, on = best[name, "off"], best[name, "on"]
        print(f"{name:36s} {off * 1e3:8.1f} ms {off / total['off']:5.1%} {on * 1e3:8.1f} ms {on / total['on']:5.1%}")
    print(f"{'total':36s} {total['off'] * 1e3:8.1f} ms {'':6s} {total['on'] * 1e3:8.1f} ms  "
          f"speed-up {total['off'] / total['on']:.3f}x; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
