#!/usr/bin/env bash
# One lease of a GPU machine, in priority order: the `gpu` tests, the memory-op benchmark (eager and compiled),
# the attention/model GPU check, then bf16 training (tiny recipe with resume, and mag_170m for MFU).
# Needs wheels in .whl/ for what the machine's image lacks (titans-pytorch and its dependencies, omegaconf,
# webdataset, braceexpand; for the Lightning DeepSpeed test deepspeed and hjson, py-cpuinfo, msgpack, ninja, einops:
#   DS_BUILD_OPS=0 .venv/bin/pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform any hjson py-cpuinfo msgpack ninja einops -d .whl
# ); carry .whl with the run. See BENCHMARKS.md. Logs go under $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
TT() { python3 -c 'import sys; from titans_train.cli import main; sys.exit(main())' "$@"; }

echo "== gpu tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_ops_memory.py tests/test_layers_attention.py 2>&1 | tail -4

echo "== Lightning DeepSpeed ZeRO-2 (gpu test: fit, resume from the DeepSpeed checkpoint, export)"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_dist_strategies.py 2>&1 | tail -6

echo "== memory op benchmark"
timeout 200 python3 benchmarks/memory_op.py --device cuda --repeats 10 --skip layer reference 2>&1 | tee "$OUT/gpu_memory_op.txt"

echo "== attention / models on GPU"
[ -f .gpucheck/check.py ] && timeout 60 python3 .gpucheck/check.py 2>&1 | tee "$OUT/gpu_models.txt"

echo "== training, bf16"
TT prepare builtin --out /tmp/builtin 2>&1 | tail -2
timeout 100 TT fit recipes/tiny.yaml data.path=/tmp/builtin logging.out_dir=/tmp/tiny logging.wandb=off \
  trainer.max_steps=40 trainer.val_every_steps=20 checkpoint.every_steps=20 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -5
cp /tmp/tiny/csv/version_0/metrics.csv "$OUT/tiny_metrics.csv" 2>/dev/null
timeout 60 TT fit recipes/tiny.yaml data.path=/tmp/builtin logging.out_dir=/tmp/tiny logging.wandb=off \
  trainer.max_steps=50 trainer.val_every_steps=20 checkpoint.every_steps=20 2>&1 | tr '\r' '\n' | grep -i "resum\|done\|error" | tail -3
timeout 150 TT fit recipes/mag_170m.yaml data.path=/tmp/builtin data.tokenizer=manifest data.chunk_len=4096 data.n_chunks=2 \
  data.batch_size=4 data.num_workers=2 train.tbptt_chunks=1 train.val_at_start=false trainer.max_steps=16 \
  trainer.log_every_steps=4 trainer.val_every_steps=1000 optim.warmup_steps=5 logging.out_dir=/tmp/m170 logging.wandb=off \
  checkpoint.every_steps=1000 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -6
cp /tmp/m170/csv/version_0/metrics.csv "$OUT/m170_metrics.csv" 2>/dev/null
python3 - <<'PY'
import csv, os
for name in ("tiny", "m170"):
    path = f"{os.environ['OUT']}/{name}_metrics.csv"
    if not os.path.exists(path):
        print(name, "no metrics"); continue
    keys = ("step", "train/loss", "val/loss", "throughput/tokens_per_s", "throughput/mfu", "memory/peak_gib")
    print(name)
    for r in csv.DictReader(open(path)):
        vals = {k: r[k] for k in keys if r.get(k)}
        if len(vals) > 1:
            print("  ", vals)
PY
