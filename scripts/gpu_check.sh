#!/usr/bin/env bash
# The one-call device check, for a machine with a GPU (8 minutes at most: the steps' time limits):
#
#   bash scripts/gpu_check.sh OUT_DIR [--smoke]
#
#   1. compiled kernels against the XLA references, every kernel  -> OUT/check_kernels.json
#   2. the kernel harness at the target shapes (targets judged)   -> OUT/bench_kernels.{json,md}
#   3. step-time profiles: the demo models, an 8B-shaped model    -> OUT/profile.json
#   4. a short real serving benchmark of the demo fleet           -> OUT/bench.json
#   5. the sm_90a compile report (needs no GPU)                   -> OUT/compile_check.json
#
# then OUT/summary.json and OUT/summary.md: each step's status and time, and the main figures.
# A step that fails or runs past its time limit is recorded as such; the others still run.
# --smoke: small shapes and interpreted kernels, to check the plumbing on a CPU in a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--smoke]}
SMOKE=${2:-}
mkdir -p "$OUT"
PY=.venv/bin/python
STEPS="$OUT/steps.tsv"
: > "$STEPS"

step() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" >&2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
  echo "== $name: exit $rc after $((SECONDS - t0))s" >&2
}

if [ "$SMOKE" = "--smoke" ]; then
  step check_kernels 600 $PY scripts/check_kernels_gpu.py --interpret --quiet --ops decode,kv_write,sparse,matmul \
    --kv-formats int4 --page-sizes 8 --gqa 4 --head-dims 64 --matmul-formats w8a8 --ms 16 --no-bf16-q \
    --json "$OUT/check_kernels.json"
  step bench_kernels 600 $PY scripts/bench_kernels.py --smoke --no-progress --json "$OUT/bench_kernels.json" \
    --markdown "$OUT/bench_kernels.md"
  step profile 900 .venv/bin/fineserve profile --models smollm2-135m-bf16 --quick --out "$OUT/profile.json"
  step bench 900 .venv/bin/fineserve bench --rates 2 --duration 10 --systems fineserve --json "$OUT/bench.json"
  step compile_check 600 $PY -m pallas_kernels.compile_check --subset fast --json "$OUT/compile_check.json"
else
  step check_kernels 100 $PY scripts/check_kernels_gpu.py --quiet --json "$OUT/check_kernels.json"
  step bench_kernels 120 $PY scripts/bench_kernels.py --no-progress --json "$OUT/bench_kernels.json" \
    --markdown "$OUT/bench_kernels.md"
  step profile 100 .venv/bin/fineserve profile --models smollm2-135m-bf16,smollm2-135m-w8a8,smollm2-135m-w4a16 \
    --random-shape 8b --precisions bf16,w4a16 --quick --out "$OUT/profile.json"
  step bench 120 .venv/bin/fineserve bench --rates 8 --duration 15 --systems fineserve,static --json "$OUT/bench.json"
  step compile_check 40 $PY -m pallas_kernels.compile_check --json "$OUT/compile_check.json"
fi
$PY scripts/gpu_check_summary.py "$OUT"
