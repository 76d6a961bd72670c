#!/usr/bin/env bash
# Follow-up on the GPU: the factored engine with and without recomputing
# adapters' inputs, on the Qwen3 and W1 accelerator sizes (bash benchmarks/gpu.sh first).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lora_jax_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
{
  timeout 150 $PY benchmarks/qwen3_train.py --size gpu --reps 7 \
      --variants full,lora,lora[recompute=False],qlora_nf4 --name qwen3_train_gpu_recompute_gpu
  timeout 130 $PY benchmarks/w1.py --size gpu --reps 9 \
      --variants floor,full,merge,factored,factored[recompute=False] --name gpu_recompute_gpu
} 2>&1 | tee "$OUT/gpu_recompute.log"
cp benchmarks/results/*recompute_gpu.* "$OUT"/ 2>/dev/null
