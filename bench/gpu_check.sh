#!/usr/bin/env bash
# The first run on a CUDA machine, in one command (under 8 minutes on one modern GPU):
#   1. the gpu-marked tests;
#   2. bf16 compute / fp16 storage extracts of the tiny config, all-MiniLM-L6-v2 and SmolLM2 on
#      SST-2 dev against fp32 CPU entries: the largest relative error of a row, per layer;
#   3. extract_overhead and tokens/s per family on the GPU (`python -m bench`, full mode);
#   4. with two GPUs visible, a two-worker Dask extract (`dask worker --resources GPU=1`, one per
#      GPU) against a single-process run.
# Prints one summary table and exits non-zero if any step failed.
#
#   bench/gpu_check.sh                 # on the GPU machine, after `make setup` and a CUDA torch build
#   bench/gpu_check.sh --cpu-dry-run   # anywhere: the same steps on the CPU, fewer rows (checks the script only)
#   PYTHON=/path/to/python bench/gpu_check.sh   # another interpreter (default .venv/bin/python)
set -uo pipefail

cd "$(dirname "$0")/.."
DRY=()
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=(--dry-run) ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (use --cpu-dry-run or --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LAYERSTORE_MODELS=${LAYERSTORE_MODELS:-$PWD/.models}
RESULTS=$(mktemp -t gpu-check-XXXXXX.jsonl)
trap 'rm -f "$RESULTS"' EXIT

step() {  # step NAME LIMIT_SECONDS COMMAND...: a step that did not record itself is recorded as failed
  local name=$1 limit=$2; shift 2
  local before t0 rc
  before=$(wc -l < "$RESULTS"); t0=$(date +%s)
  echo "== $name" >&2
  timeout --kill-after=10 "$limit" "$@" >&2; rc=$?
  if [ "$(wc -l < "$RESULTS")" = "$before" ]; then
    local why="exit $rc"; [ "$rc" = 124 ] && why="timed out after ${limit} s"
    "$PY" -m bench.gpu_check record --results "$RESULTS" --name "$name" --status FAIL --seconds $(( $(date +%s) - t0 )) --detail "$why"
  fi
}

step environment 120 "$PY" -m bench.gpu_check env --results "$RESULTS" "${DRY[@]}"
if [ -z "${DRY[*]}" ] && grep -q '"FAIL"' "$RESULTS"; then
  "$PY" -m bench.gpu_check summary --results "$RESULTS"; exit 1
fi

t0=$(date +%s)
timeout --kill-after=10 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests > >(tail -n 3 >&2) 2>&1; rc=$?
if [ -n "${DRY[*]}" ]; then status=dry-run; detail="pytest -m gpu exit $rc (the tests skip without CUDA)"
elif [ $rc = 0 ]; then status=pass; detail="pytest -m gpu passed"
else status=FAIL; detail="pytest -m gpu exit $rc"; fi
"$PY" -m bench.gpu_check record --results "$RESULTS" --name "gpu tests" --status "$status" --seconds $(( $(date +%s) - t0 )) --detail "$detail"

step compare 300 "$PY" -m bench.gpu_check compare --results "$RESULTS" "${DRY[@]}"
step extract_overhead 200 "$PY" -m bench.gpu_check throughput --results "$RESULTS" "${DRY[@]}"
step "dask 2 workers" 150 "$PY" -m bench.gpu_check dask --results "$RESULTS" "${DRY[@]}"

echo
"$PY" -m bench.gpu_check summary --results "$RESULTS"
