#!/usr/bin/env bash
# One-shot GPU check (H100/H200, no internet, torch already installed): build for sm_90a, run every `cuda` test,
# run the quick benchmarks, and write summary.md + results.json (+ logs) into RESULTS_DIR (default bench/results/).
# Budget: under 8 minutes in all; each stage has its own time limit so a hang cannot eat the others' time.
#   MIXTRAL_EXT_COMMIT=<sha>  commit to record when .git is not available (the device gets a copy of the tree)
#   DEVICE_CHECK_TESTS="..."  pytest selection (default: -m cuda over tests/)
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-bench/results}")
mkdir -p "$out"
py=${PYTHON:-python3}
stamp=$(date -u +%Y-%m-%dT%H:%M:%SZ)
export MIXTRAL_EXT_COMMIT=${MIXTRAL_EXT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "device_check: $stamp commit $MIXTRAL_EXT_COMMIT -> $out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/nvidia-smi.txt" 2>&1

t0=$(date +%s)
export MIXTRAL_EXT_ARCH=90a MAX_JOBS=$(nproc) MIXTRAL_EXT_CUDA=1
[ -n "${CUDA_HOME:-}" ] || { [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda; }
timeout 240 "$py" -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
build_rc=$?
echo "build: rc=$build_rc in $(( $(date +%s) - t0 )) s"; tail -3 "$out/build.log"

t1=$(date +%s)
# -v prints one line per test as it finishes, so a stage killed by its time limit still leaves countable results.
timeout 240 "$py" -m pytest ${DEVICE_CHECK_TESTS:--m cuda tests} -v -p no:cacheprovider \
  --junitxml="$out/junit.xml" > "$out/tests.log" 2>&1
tests_rc=$?
echo "tests: rc=$tests_rc in $(( $(date +%s) - t1 )) s"; tail -3 "$out/tests.log"

t2=$(date +%s)
timeout 100 "$py" bench/bench_kernels.py --quick --probe-seconds 10 --json "$out/bench_kernels.json" \
  > "$out/bench_kernels.log" 2>&1
kb_rc=$?
timeout 80 "$py" bench/bench_e2e.py --quick --json "$out/bench_e2e.json" > "$out/bench_e2e.log" 2>&1
e2e_rc=$?
echo "benchmarks: kernels rc=$kb_rc e2e rc=$e2e_rc in $(( $(date +%s) - t2 )) s"

"$py" bench/device_check_report.py "$out" --stamp "$stamp" --build-rc $build_rc --tests-rc $tests_rc \
  --bench-rc $kb_rc --e2e-rc $e2e_rc --seconds $(( $(date +%s) - t0 ))
