#!/usr/bin/env bash
# Every GPU figure the docs quote (docs/gpu.md), in one run on a lent GPU machine:
# the CUDA-only tests, selection on the GPU vs the textbook loop, distillation throughput,
# the calibrated prune's cost (EVA02-L and EVA02-E: time in forward passes, peak memory),
# EVA02-E throughput at MLP r=1 with and without half the heads (docs/heads.md).
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh          # QUICK=1: tiny sizes, to try it on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dgmr-gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ "${QUICK:-0}" = 1 ]; then
  DEV=cpu SHAPES=512x64,vit-b MODEL=timm:vit_tiny_patch16_224 BATCH=8 IMAGES=32 WORKERS=2
  STEPS=eager,eager:math RUNS=eager,eager:math CAL_MODELS=eva02-l CAL_ARGS="--tiny --images 16"
else
  DEV=cuda SHAPES=vit-b,vit-l,vit-h,vit-g,eva-e MODEL=timm:vit_large_patch14_clip_224 BATCH=256 IMAGES=2048 WORKERS=14
  STEPS=${STEPS:-eager,on,on:cudnn,on:flash} RUNS=${RUNS:-eager,on} CAL_MODELS=${CAL_MODELS:-eva02-l,eva02-e} CAL_ARGS=""
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, timm, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
[ "${SKIP_SELECTION:-0}" = 1 ] || {
$PY -m pytest -q -p no:cacheprovider -m cuda tests/test_criteria.py tests/test_calibrate.py tests/test_sweep.py tests/test_heads.py 2>&1 \
  | tee "$OUT/pytest_cuda.log"
$PY benchmarks/selection.py --device "$DEV" --shapes "$SHAPES" --repeats 3 --json "$OUT/selection.json" 2>&1 \
  | tee "$OUT/selection.log"
}
$PY benchmarks/distill_throughput.py --device "$DEV" --model "$MODEL" --batch-size "$BATCH" --steps 10 \
  --images "$IMAGES" --epochs 3 --workers "$WORKERS" --step-variants "$STEPS" --distill-variants "$RUNS" \
  --deadline-s "${DEADLINE:-1e9}" --json "$OUT/distill.json" 2>&1 | tee "$OUT/distill.log"
[ "${SKIP_CALIBRATION:-0}" = 1 ] || \
$PY benchmarks/calibration.py --speed --phases --device "$DEV" --models "$CAL_MODELS" $CAL_ARGS --json "$OUT/calibration.json" 2>&1 \
  | tee "$OUT/calibration.log"
[ "${SKIP_HEADS:-0}" = 1 ] || \
$PY benchmarks/heads.py --models none --eva $([ "$DEV" = cuda ] && echo --throughput) --json "$OUT/heads.json" 2>&1 \
  | tee "$OUT/heads.log"
