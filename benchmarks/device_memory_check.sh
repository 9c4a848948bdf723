#!/usr/bin/env bash
# One lease of a GPU machine: the memory op's GPU test, its GPU benchmark, and the CPU benchmark on 2 pinned
# cores (a quiet stand-in for the 2-core development machine). Needs the titans-pytorch wheels in .whl/
# (see README "Benchmarks"). Writes logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, titans_pytorch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 -m pytest -q -p no:cacheprovider tests/test_ops_memory.py -k "gpu or chunk16" 2>&1 | tail -3
python3 benchmarks/memory_op.py --device cuda --repeats 10 2>&1 | tee "$OUT/gpu_T2048.txt"
python3 benchmarks/memory_op.py --device cuda --T 16384 --skip reference --repeats 5 2>&1 | tee "$OUT/gpu_T16384.txt"
export OMP_NUM_THREADS=2
taskset -c 0,1 python3 benchmarks/memory_op.py --device cpu --profile --T 1024 2>&1 | tee "$OUT/cpu2_profile.txt" | head -40
taskset -c 0,1 python3 benchmarks/memory_op.py --device cpu --repeats 3 2>&1 | tee "$OUT/cpu2_bench.txt"
