#!/usr/bin/env bash
# One-shot GPU check (never in CI): CUDA tests, the recording benchmark's GPU presets (SD3.5-medium- and
# Flux.1-dev-sized random weights, 1024², bf16) and study throughput. Results go to $OUT (default
# benchmarks/results/gpu). Wheels in .whl/ (diffusers etc., when the machine lacks them) are installed first.
#   STEPS=10 bash benchmarks/gpu_run.sh
set -u
OUT=$(realpath -m "${OUT:-benchmarks/results/gpu}")
LOG="$OUT/log.txt"
STEPS=${STEPS:-10}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$LOG"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -25 | tee -a "$LOG"
for preset in ${PRESETS:-flux-dev-1024:190 sd35-medium-1024:130}; do
  timeout "${preset#*:}" python3 benchmarks/bench_recording.py --preset "${preset%:*}" --steps "$STEPS" --out "$OUT" 2>&1 \
    | grep -v "Processor\|kept in float32" | tee -a "$LOG"
done
[ "${STUDY:-1}" = 1 ] && timeout 80 python3 benchmarks/bench_study.py --sizes 8 32 --steps 4 --device cuda --out "$OUT/study-default-cuda.json" 2>&1 \
  | tail -6 | tee -a "$LOG"
