#!/usr/bin/env bash
# One-shot GPU measurement for a lent H100/H200 without internet access.
# Installs nothing: uses $PYTHON, else the carried .venv, else python3 (it needs a CUDA build of torch,
# triton, and a C compiler for triton's launcher stub). Steps: the kernel tests (the CUDA ones run here),
# then benchmarks/gpu_bench.py. The table goes to stdout and to $OUT/gpu_bench.md (or benchmarks/).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi
export PYTHONPATH="$ROOT/server:$ROOT/client${PYTHONPATH:+:$PYTHONPATH}"
unset REBALANCER_SOLVER_PATH TRITON_INTERPRET

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY'
import sys

import torch

print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, GPU {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("gpu_bench.sh: this torch has no CUDA (a CPU build?); point PYTHON at an interpreter with CUDA torch")
PY

echo "== kernel tests on CUDA"
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py

echo "== solve benchmark"
"$PY" benchmarks/gpu_bench.py "$@" | tee "${OUT:-$ROOT/benchmarks}/gpu_bench.md"
