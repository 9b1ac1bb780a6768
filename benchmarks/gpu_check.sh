#!/usr/bin/env bash
# One prepared call on the lent GPU machine (H200, 16 cores, torch+CUDA, triton, no network), sized to
# fit 15 minutes of device time with room to run it twice: every stage has its own time limit (150 +
# 120 + 255 s: at most 8.75 minutes), writes what it got to $OUT, and a short table is printed last.
#   device tool:  bash benchmarks/gpu_check.sh [pytest -k filter for the benchmarks]
# Stages: build (sm_90 only, 16 jobs, ptxas report kept) -> the GPU tests (gpu- and triton-marked: the
# ones no CPU machine can run) -> the benchmarks, one file at a time -> the table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fastgen_gpu}; mkdir -p "$OUT"
PY=python3
T0=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - T0 )) s in)"; }

stage "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/device.txt"

# fastgen runs from the tree here (not installed): fastgen.kernels is kernels/ (setup.py's package_dir)
[ -e fastgen/kernels ] || ln -s ../kernels fastgen/kernels

stage "build: fastgen._C with csrc/cuda for sm_90 (limit 150 s)"
if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTGEN_PTXAS_VERBOSE=1 timeout 150 \
    $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; echo "build failed: see $OUT/build.log"; exit 1
fi
$PY -P benchmarks/cuda_build_check.py "$OUT/build.log" "$OUT/cuda_resources.md" 2>&1 | tail -4
$PY -c "import fastgen, json; print(json.dumps(fastgen.backends(), indent=1))" > "$OUT/backends.json"

stage "GPU tests: -m 'gpu or triton' (limit 120 s)"
FASTGEN_REQUIRE=cpp,cuda,triton timeout 120 $PY -m pytest tests/ -q -m "gpu or triton" -p no:cacheprovider \
  > "$OUT/tests_gpu.txt" 2>&1
echo "exit $?" >> "$OUT/tests_gpu.txt"; tail -12 "$OUT/tests_gpu.txt"

stage "benchmarks, one file at a time (limit 25-50 s each, 255 s in all)"
# bench_gan without its compiled contender (inductor's compile of two DCGAN steps would take its whole limit)
for spec in masked_conv:40 gated:40 dmol:25 vae:25 batch_norm_act:40 gan:35 sampling:50; do
  name=${spec%%:*}; limit=${spec##*:}; filter=${1:-}
  [ "$name" = gan ] && [ -z "$filter" ] && filter="not compile"
  timeout "$limit" $PY -m pytest "benchmarks/bench_$name.py" --benchmark-only -q -p no:cacheprovider \
    ${filter:+-k "$filter"} --benchmark-max-time=0.25 --benchmark-min-rounds=3 \
    --benchmark-json="$OUT/bench_$name.json" > "$OUT/bench_$name.txt" 2>&1
  echo "bench_$name: exit $? ($(grep -cE 'PASSED|passed' "$OUT/bench_$name.txt") summary lines)"
done

stage "table"
for f in "$OUT"/bench_*.json; do [ -s "$f" ] && PYTHONPATH=. $PY benchmarks/harness.py "$f"; done 2>&1 | tee "$OUT/table.txt"
stage "done"
