#!/usr/bin/env bash
# One call on the lent GPU machine: build the CUDA extension, run the tests
# (Triton for real, CUDA kernels), run the GPU benchmarks, print a short table.
# Usage (device tool): bash benchmarks/gpu_check.sh [pytest -k filter for benchmarks]
# The machine has torch+CUDA, triton, pytest-benchmark, ninja and no network:
# build against its python3 with --no-build-isolation --no-deps.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fastgen_gpu}; mkdir -p "$OUT"
PY=python3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
echo "== build"
$PY -m pip install -e . --no-build-isolation --no-deps -q 2>&1 | tail -5 || exit 1
$PY -c "import fastgen, json; print(json.dumps(fastgen.backends(), indent=1))"
echo "== tests"
FASTGEN_REQUIRE=cpp,cuda,triton $PY -m pytest tests/ -q -m "not slow" 2>&1 | tail -15 | tee "$OUT/tests.txt"
echo "== benchmarks"
$PY -m pytest benchmarks/ --benchmark-only -q ${1:+-k "$1"} --benchmark-json="$OUT/bench.json" \
    --benchmark-columns=median,min,iqr,rounds 2>&1 | tail -60 | tee "$OUT/bench.txt"
echo "== table"
$PY -m fastgen.testing "$OUT/bench.json"
