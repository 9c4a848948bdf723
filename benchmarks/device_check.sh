#!/usr/bin/env bash
# One lease of a GPU machine (under 10 minutes), in priority order; every step has its own timeout, cut to what is
# left of the budget, so the last steps are the ones dropped when time runs out:
#   1. the `gpu` tests (Triton memory kernels vs the reference, the op and attention on CUDA);
#   2. the memory-op benchmark at T = 2K, B*H = 8, chunks 16 and 64: Triton kernels vs the autograd step vs
#      titans-pytorch (TF32 matmuls; % of the measured bf16 matmul rate);
#   3. bf16 training of mag_170m and transformer_170m at 4K tokens per sequence chunk (tokens/s, MFU against the
#      bf16 matmul rate measured here), 4. the Lightning DeepSpeed ZeRO-2 test (fit, resume, export),
#   5. the same training at 32K tokens, 6. the op at B*H = 256 and at T = 16K.
# Needs wheels in .whl/ for what the machine's image lacks (4.6 MB; rebuild with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d .whl titans-pytorch==0.5.5 \
#     assoc-scan==0.0.6 axial-positional-embedding==0.3.12 einops==0.8.2 einx==0.4.3 hyper-connections==0.4.11 \
#     rotary-embedding-torch==0.9.1 tensordict==0.15.3 x-transformers==2.31.10 omegaconf==2.4.0 webdataset==1.0.2 \
#     braceexpand==0.1.7 hjson py-cpuinfo msgpack ninja==1.13.2 loguru==0.7.3 frozendict==2.5.1 cloudpickle==3.1.3 \
#     pyvers==0.2.3 torch-einops-utils==0.2.0 accelerated-scan==0.3.1
#   DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
# ) and carry it:  run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600).
# Triton comes with the image's CUDA torch. Logs go under $OUT (one file per step); a summary is printed at the end.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-580}  # seconds for everything, setup included
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# step NAME SECONDS CMD...: run CMD with min(SECONDS, time left) and log it to $OUT/NAME.txt
step() {
  local name=$1 want=$2; shift 2
  local t; t=$(left); [ "$t" -gt "$want" ] && t=$want
  if [ "$t" -lt 20 ]; then echo "== $name: skipped (no time left)" | tee "$OUT/$name.txt"; return; fi
  echo "== $name (timeout ${t}s, $(left)s left)"
  timeout "$t" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  tail -n 25 "$OUT/$name.txt" | tr '\r' '\n' | grep -v "it/s\]$" | tail -n 15
  echo "   rc=$rc"
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled PATH=/tmp/site/bin:$PATH
export TRITON_CACHE_DIR=/tmp/triton-cache  # one cache for every step: each kernel shape compiles once
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, lightning; print('torch', torch.__version__, 'triton', triton.__version__, \
'lightning', lightning.__version__)" | tee -a "$OUT/device.txt"
TT() { python3 -c 'import sys; from titans_train.cli import main; sys.exit(main())' "$@"; }

step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_ops_memory_triton.py \
  tests/test_ops_memory.py tests/test_layers_attention.py

BENCH="python3 benchmarks/memory_op.py --device cuda --tf32 --repeats 5 --H 4 --case-timeout 60 \
  --skip op op_channel_alpha op_compiled layer reference"
# the issue's shape first (T = 2K, B*H = 8), then training at 4K, DeepSpeed, training at 32K, the other op shapes
step op_T2K_BH8 100 $BENCH --B 2 --T 2048 --chunks 16 64

TT prepare builtin --out /tmp/builtin > "$OUT/prepare.txt" 2>&1
# 8 optimiser steps of 16K tokens each (4 x 4K or 1 x 32K; more would not fit the lease); the throughput callback
# skips the first step, which pays for compiling the Triton kernels (MAG) and flex attention
train() {  # train MODEL SEQ SECONDS
  local model=$1 seq=$2 batch=$(( 16384 / $2 )); [ "$batch" -lt 1 ] && batch=1
  # TF32 for fp32 matmuls (the memory op computes in fp32 under bf16 autocast; its Triton kernels follow torch's
  # setting, which the trainer leaves at "highest")
  step "train_${model}_${seq}" "$3" python3 -c 'import sys, torch; torch.set_float32_matmul_precision("high")
from titans_train.cli import main; sys.exit(main())' \
    fit "recipes/$model.yaml" data.path=/tmp/builtin data.tokenizer=manifest data.chunk_len=$seq \
    model.max_seq_len=$seq data.n_chunks=1 data.batch_size=$batch data.num_workers=2 train.val_at_start=false \
    trainer.max_steps=8 trainer.log_every_steps=2 trainer.val_every_steps=1000 optim.warmup_steps=2 \
    checkpoint.every_steps=1000 logging.wandb=off "logging.out_dir=/tmp/train_${model}_${seq}"
  cp "/tmp/train_${model}_${seq}/csv/version_0/metrics.csv" "$OUT/train_${model}_${seq}.csv" 2>/dev/null
}
train mag_170m 4096 120
train transformer_170m 4096 60

step deepspeed_zero2 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_dist_strategies.py

train mag_170m 32768 90
train transformer_170m 32768 60
step op_T2K_BH256 60 $BENCH --B 64 --T 2048 --chunks 16
step op_T16K_BH8 60 $BENCH --B 2 --T 16384 --chunks 16
step op_T16K_BH256 45 $BENCH --B 64 --T 16384 --chunks 16 --skip op op_channel_alpha op_compiled layer \
  reference titans_pytorch op_autograd

python3 - <<'PY' 2>&1 | tee "$OUT/summary.txt"
"""tokens/s and MFU of each training run, MFU against the bf16 matmul rate measured now on this GPU."""
import csv, glob, os, time
import torch
from titans_train.train.callbacks import device_peak_flops

n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ a
torch.cuda.synchronize()
reps, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 2.0:
    a @ a
    reps += 1
torch.cuda.synchronize()
measured = 2 * n**3 * reps / (time.perf_counter() - t0)
sheet = device_peak_flops(torch.device("cuda"))
print(f"{torch.cuda.get_device_name()}: measured bf16 matmul {measured / 1e12:.0f} TFLOP/s (data sheet "
      f"{sheet / 1e12 if sheet else float('nan'):.0f})")
for path in sorted(glob.glob(os.path.join(os.environ["OUT"], "train_*.csv"))):
    rows = [r for r in csv.DictReader(open(path)) if r.get("throughput/tokens_per_s")]
    if not rows:
        print(os.path.basename(path), "no throughput rows")
        continue
    tps = float(rows[-1]["throughput/tokens_per_s"])
    mfu = float(rows[-1]["throughput/mfu"]) * sheet / measured if rows[-1].get("throughput/mfu") and sheet else None
    loss = [r.get("train/loss") for r in rows if r.get("train/loss")]
    print(f"{os.path.basename(path)[:-4]:<32} tokens/s {tps:>10.0f}  MFU(measured bf16) "
          f"{'-' if mfu is None else f'{100 * mfu:.1f}%'}  last loss {loss[-1] if loss else '-'}")
PY
echo "total $(( $(date +%s) - START ))s"
