"""Benchmark the neural-memory op: forward+backward tokens/s, peak memory, and matmul efficiency.

Compares, in one run and on one device:
  - ours (op):      titans_train.ops.memory_update (chunked dual form, exact per token; impl="auto", which on CPU
                    is the compiled C++ kernel, ops/neural_memory/cpu_kernel.cpp)
  - ours (op_compiled): the same with compile=True (the per-chunk step through torch.compile)
  - ours (op_autograd): the same with impl="autograd" (the per-chunk step under autograd, the pre-Function path)
  - ours (op_triton): the same with impl="triton" (Triton kernels, one program per (batch, head); the "auto" pick
                    on CUDA, so skip it there or compare it with op_autograd)
  - ours (op_channel_alpha): the autograd step with channel-wise alpha (B, H, T, D) (the kernels have none)
  - ours (layer):   titans_train.layers.NeuralMemory (projections, conv, rates, output gate around the op)
  - reference:      memory_update_reference (token loop, the specification) at a small T
  - titans-pytorch: titans_pytorch.NeuralMemory with the same heads/dims/chunk (one update per chunk)
and prints tokens/s ratios against titans-pytorch plus the fraction of the device's measured fp32 matmul FLOP/s
that the op reaches (FLOPs counted analytically, see `op_flops`); on CUDA also of the measured bf16 matmul rate.
`--tf32` lets fp32 matmuls use TF32 tensor cores (torch.set_float32_matmul_precision("high")) in every case,
the Triton kernels' included.

Each case runs in its own subprocess so that peak memory (CPU: max RSS growth; CUDA: max allocated) is the
case's own.

    python benchmarks/memory_op.py                       # B=2 H=4 T=2048 D=64, chunks 16 and 64, CPU
    python benchmarks/memory_op.py --device cuda --T 8192
    python benchmarks/memory_op.py --device cuda --tf32 --B 64 --skip op_compiled layer reference
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def op_flops(B: int, H: int, T: int, D: int, depth: int, expansion: int, chunk: int) -> float:
    """Matmul FLOPs of one forward+backward of memory_update (elementwise work not counted).

    Per memory chunk of b tokens and per (batch, head), for each memory layer l (d_in x d_out):
    keys forward 2*b*d_in*d_out; error back-propagation 2*b*d_in*d_out (layers after the first);
    chunk-end state update (weights and momentum) 2 x 2*b*d_in*d_out; query read-out with the anchor weights and
    momentum 2 x 2*b*d_in*d_out; the causal b x b scores 2*b*b*d_in and their product with the errors 2*b*b*d_out.
    Plus the coefficient matmuls 2*b^3 + 2*b^2. Backward = 2 x forward (each matmul's two gradient matmuls).
    """
    dims = [D] + [expansion * D] * (depth - 1) + [D]
    b = chunk
    fwd = 2 * b**3 + 2 * b**2
    for l in range(depth):
        di, do = dims[l], dims[l + 1]
        fwd += 2 * b * di * do  # keys forward
        if l > 0:
            fwd += 2 * b * di * do  # delta_{l-1} = delta_l W_l^T
        fwd += 2 * (2 * b * di * do)  # state update
        fwd += 2 * (2 * b * di * do)  # X_q W_0, X_q S_0
        fwd += 2 * b * b * di + 2 * b * b * do  # scores, scores @ delta
    n_chunks = -(-T // b)
    return 3.0 * fwd * n_chunks * B * H


def matmul_flops_per_s(device: str, n: int = 2048, seconds: float = 3.0, dtype=torch.float32) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_case(name: str, B: int, H: int, T: int, D: int, chunk: int, device: str):
    """Returns (step_fn, tokens per step). step_fn runs forward + backward once."""
    torch.manual_seed(0)
    depth, exp = 2, 4
    if name in ("op", "op_compiled", "op_autograd", "op_triton", "op_channel_alpha", "reference"):
        import functools

        from titans_train.ops import memory_update, memory_update_reference

        fn = {"op": memory_update, "op_compiled": functools.partial(memory_update, compile=True),
              "op_autograd": functools.partial(memory_update, impl="autograd"),
              "op_triton": functools.partial(memory_update, impl="triton"),
              "op_channel_alpha": memory_update,
              "reference": memory_update_reference}[name]
        leaf = lambda *s: torch.randn(*s, device=device).requires_grad_()  # noqa: E731
        unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, device=device), dim=-1).requires_grad_()  # noqa: E731
        q, k, v = unit(B, H, T, D), unit(B, H, T, D), leaf(B, H, T, D)
        rate = lambda lo, hi: (lo + (hi - lo) * torch.rand(B, H, T, device=device)).requires_grad_()  # noqa: E731
        theta, eta, alpha = rate(0.0, 0.05), rate(0.5, 1.0), rate(0.0, 0.01)
        if name == "op_channel_alpha":
            alpha = (0.01 * torch.rand(B, H, T, D, device=device)).requires_grad_()
        dims = [D, exp * D, D]
        W = tuple((torch.randn(B, H, dims[i], dims[i + 1], device=device) / dims[i] ** 0.5).requires_grad_() for i in range(depth))
        S = tuple(torch.zeros(B, H, dims[i], dims[i + 1], device=device).requires_grad_() for i in range(depth))

        def step():
            y, w, s = fn(q, k, v, theta, eta, alpha, W, S, chunk_size=chunk)
            (y.square().mean() + sum(x.square().mean() for x in w)).backward()

        return step
    if name == "layer":
        from titans_train.layers.neural_memory import NeuralMemory

        layer = NeuralMemory(H * D, H, head_dim=D, depth=depth, expansion=exp, chunk_size=chunk).to(device)
        x = torch.randn(B, T, H * D, device=device, requires_grad=True)

        def step():
            y, _ = layer(x)
            y.square().mean().backward()

        return step
    if name == "titans_pytorch":
        from titans_pytorch import NeuralMemory as TPNeuralMemory

        mem = TPNeuralMemory(dim=H * D, chunk_size=chunk, heads=H, dim_head=D,
                             default_model_kwargs=dict(depth=depth, expansion_factor=float(exp))).to(device)
        x = torch.randn(B, T, H * D, device=device, requires_grad=True)

        def step():
            y, _ = mem(x)
            y.square().mean().backward()

        return step
    raise ValueError(f"unknown case {name!r}")


def run_case(name: str, B: int, H: int, T: int, D: int, chunk: int, device: str, repeats: int) -> dict:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = build_case(name, B, H, T, D, chunk, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step()  # warm-up (allocator, lazy init, torch.compile)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # KiB -> MiB (Linux)
    return {"case": name, "T": T, "chunk": chunk, "seconds": best, "tokens_per_s": B * T / best, "peak_mib": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--reference-T", type=int, default=64, help="T for the (slow) token-loop reference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], help="cases to skip: op op_compiled op_autograd "
                   "op_triton op_channel_alpha layer reference titans_pytorch")
    p.add_argument("--case-timeout", type=float, default=None, help="seconds per case (its own process) before it "
                   "is reported as timed out")
    p.add_argument("--tf32", action="store_true", help="fp32 matmuls may use TF32 (every case, the peak included)")
    p.add_argument("--profile", action="store_true", help="print the torch profiler's top ops for our op and exit")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process, print JSON
    p.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.tf32:
        torch.set_float32_matmul_precision("high")
    if args.case:
        T = args.reference_T if args.case == "reference" else args.T
        print(json.dumps(run_case(args.case, args.B, args.H, T, args.D, args.chunk, args.device, args.repeats)))
        return 0

    if args.profile:
        from torch.profiler import profile

        step = build_case("op", args.B, args.H, args.T, args.D, args.chunks[0], args.device)
        step()
        with profile(record_shapes=True) as prof:
            step()
            sync(args.device)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25,
                                                                 max_name_column_width=28, max_shapes_column_width=60))
        return 0
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    peak = matmul_flops_per_s(args.device)
    fp32 = "tf32" if args.tf32 else "fp32"
    print(f"device: {dev_name}; torch {torch.__version__}; measured {fp32} matmul (2048^2): {peak / 1e9:.1f} GFLOP/s")
    peak_bf16 = None
    if args.device.startswith("cuda"):
        peak_bf16 = matmul_flops_per_s(args.device, n=8192, dtype=torch.bfloat16)
        print(f"measured bf16 matmul (8192^2): {peak_bf16 / 1e12:.1f} TFLOP/s")
    print(f"B={args.B} H={args.H} T={args.T} D={args.D}, 2-layer memory (D -> 4D -> D); fwd+bwd, best of {args.repeats}")
    hdr = f"{'case':<16}{'chunk':>6}{'T':>7}{'tokens/s':>12}{'vs titans-pytorch':>19}{'peak MiB':>10}{'% matmul peak':>15}"
    print(hdr)
    print("-" * len(hdr))
    for chunk in args.chunks:
        rows = {}
        for case in ("titans_pytorch", "op", "op_autograd", "op_triton", "op_channel_alpha", "op_compiled",
                     "layer", "reference"):
            if case in args.skip:
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--chunk", str(chunk), "--device", args.device,
                   "--B", str(args.B), "--H", str(args.H), "--T", str(args.T), "--D", str(args.D),
                   "--reference-T", str(args.reference_T), "--repeats", str(1 if case == "reference" else args.repeats)]
            cmd += ["--tf32"] if args.tf32 else []
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
            except subprocess.TimeoutExpired:
                print(f"{case:<16}{chunk:>6}  timed out after {args.case_timeout:.0f} s")
                continue
            if out.returncode != 0:
                print(f"{case:<16}{chunk:>6}  failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                continue
            rows[case] = json.loads(out.stdout.strip().splitlines()[-1])
        base = rows.get("titans_pytorch", {}).get("tokens_per_s")
        for case, r in rows.items():
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
            eff = "-"
            if case.startswith("op"):
                flops = op_flops(args.B, args.H, r["T"], args.D, 2, 4, chunk)
                eff = f"{100 * flops / r['seconds'] / peak:.1f}%"
                r["gflop_per_s"] = flops / r["seconds"] / 1e9
            print(f"{case:<16}{chunk:>6}{r['T']:>7}{r['tokens_per_s']:>12.0f}{ratio:>19}{r['peak_mib']:>10.0f}{eff:>15}")
            if "gflop_per_s" in r:
                bf16 = f", {100 * r['gflop_per_s'] * 1e9 / peak_bf16:.1f}% of bf16" if peak_bf16 else ""
                print(f"{'':<16}{'':>6}{'':>7}  op: {r['gflop_per_s']:.1f} GFLOP/s of {peak / 1e9:.1f} measured{bf16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
