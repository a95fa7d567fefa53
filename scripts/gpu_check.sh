#!/usr/bin/env bash
# The GPU check: CUDA tests (<= 150 s) then the device speed benchmark (<= 240 s), under 8 minutes in all.
# Writes $OUT (default ./gpu_out): gpu_check.json, gpu_check.md, pytest.log, bench.log, bench/.
# Needs no install: run from anywhere; it runs the repository it lives in with PYTHONPATH=that root.
#   scripts/gpu_check.sh                 # on a CUDA machine (TinyLlama-1.1B shape, bf16)
#   DEVICE=cpu scripts/gpu_check.sh      # dry run on the CPU: tiny model, quick, ~1-2 min
# More settings (TESTS_K, TESTS_TIMEOUT, BENCH_TIMEOUT, MODEL, DTYPE, QUICK, BENCH_ARGS): scripts/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-$PWD/gpu_out}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 20 nvidia-smi > "$OUT/nvidia-smi.log" 2>&1 || true
fi
# the script's own limit: the parts' limits plus the environment probe and slack; never hangs past it
timeout -k 10 "${CHECK_TIMEOUT:-480}" "${PYTHON:-python}" scripts/gpu_check.py
rc=$?
[ "$rc" = 124 ] && echo "gpu_check: stopped after ${CHECK_TIMEOUT:-480} s; partial results in $OUT" >&2
exit "$rc"
