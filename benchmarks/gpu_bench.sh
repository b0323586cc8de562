#!/usr/bin/env bash
# One-shot GPU measurement for a lent H100/H200 without internet access; installs nothing. Uses $PYTHON, else
# the carried .venv, else python3 (it needs CUDA torch, triton and a C compiler for triton's launcher stub).
# Runs the kernel tests (the CUDA ones run here), then benchmarks/gpu_bench.py into $OUT/gpu_bench.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
export PYTHONPATH="$ROOT/server:$ROOT/client:$ROOT/wire:$ROOT/testkit${PYTHONPATH:+:$PYTHONPATH}"
unset REBALANCER_SOLVER_PATH TRITON_INTERPRET

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import sys, torch; print(torch.__version__, torch.version.cuda); sys.exit(not torch.cuda.is_available())' \
  || { echo "gpu_bench.sh: this torch has no CUDA; point PYTHON at an interpreter with CUDA torch" >&2; exit 1; }

echo "== kernel tests on CUDA"
# A failure here must not cost the figures (a lent GPU's time is short): the benchmark runs anyway and the
# script's exit status reports it. (triton 3.6's interpreter fails the interpreted half; 3.9 passes.)
tests=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py || tests=$?

echo "== solve benchmark"
"$PY" benchmarks/gpu_bench.py "$@" | tee "${OUT:-$ROOT/benchmarks}/gpu_bench.md"
exit "$tests"
