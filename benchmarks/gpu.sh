#!/usr/bin/env bash
# The accelerator figures in one short run (a lent GPU machine whose python3
# already has jax[cuda], flax, optax, chex and orbax): the tunix-style Qwen3
# LoRA step at Qwen3-0.6B's shapes, W3's memory, W1 at the accelerator size,
# then the engine zoo's equalities on the GPU. Each part has its own time
# limit so that one slow part cannot eat the others'. Results land in
# benchmarks/results/ (and in $OUT when set).
#
#   bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lora_jax_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
log=$OUT/gpu.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import jax, flax, optax, chex, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  part() {  # $1 = seconds, then the command
    local limit=$1; shift
    echo "=== $* (limit ${limit} s, at ${SECONDS} s)"
    timeout "$limit" "$@"; echo "=== exit $? at ${SECONDS} s"
  }
  part 210 $PY benchmarks/qwen3_train.py --size gpu --reps 7
  part 110 $PY benchmarks/w3.py --reps 5
  part 150 $PY benchmarks/w1.py --size gpu --reps 9 \
      --variants forward,merged_forward,floor,full,merge,factored
  JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest part 80 $PY -m pytest -q -x -p no:cacheprovider \
      tests/test_engine_zoo.py -k "not mixed"
} 2>&1 | tee "$log"
cp benchmarks/results/qwen3_train_gpu_gpu.* benchmarks/results/w3_gpu.* \
   benchmarks/results/gpu_gpu.* "$OUT"/ 2>/dev/null
ls -la "$OUT"
