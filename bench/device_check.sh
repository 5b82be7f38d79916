#!/usr/bin/env bash
# One-shot GPU check (H100/H200, no internet, torch already installed): build for sm_90a, run every `cuda` test,
# run the quick benchmarks, and write summary.md + results.json (+ logs) into RESULTS_DIR (default bench/results/).
# Budget: under 8 minutes in all (worst case with every limit hit: ~9); each stage has its own time limit so a hang cannot eat the others' time.
#   MIXTRAL_EXT_COMMIT=<sha>  commit to record when .git is not available (the device gets a copy of the tree)
#   DEVICE_CHECK_TESTS="..."  test files to run (default: every tests/test_*.py with cuda tests, kernels first)
#   DEVICE_CHECK_SKIP_BUILD=1 use the extension as installed (a dry run of the plumbing on a CPU machine)
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-bench/results}")
mkdir -p "$out"
py=${PYTHON:-python3}
stamp=$(date -u +%Y-%m-%dT%H:%M:%SZ)
export MIXTRAL_EXT_COMMIT=${MIXTRAL_EXT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "device_check: $stamp commit $MIXTRAL_EXT_COMMIT -> $out"

t0=$(date +%s)
export MIXTRAL_EXT_ARCH=90a MAX_JOBS=$(nproc) MIXTRAL_EXT_CUDA=1
[ -n "${CUDA_HOME:-}" ] || { [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda; }
if [ "${DEVICE_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  echo "build skipped (DEVICE_CHECK_SKIP_BUILD=1)" > "$out/build.log"; build_rc=0
else
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    timeout 180 "$py" -m pip install --no-build-isolation --no-deps -e . 2>&1; } > "$out/build.log"
  build_rc=$?
fi
echo "build: rc=$build_rc in $(( $(date +%s) - t0 )) s"; tail -3 "$out/build.log"

t1=$(date +%s)
# One pytest process per test file, each with its own time limit, so a hung kernel costs one file, not the run.
# -v prints one line per test as it finishes, so even a file killed by its limit leaves countable results.
tests_budget=${DEVICE_CHECK_TEST_SECONDS:-250}
files=${DEVICE_CHECK_TESTS:-$(grep -l "mark.cuda" tests/test_rms_norm.py tests/test_rope_kv_append.py tests/test_moe_route.py \
  tests/test_attention_decode.py tests/test_moe_experts.py tests/test_attention_prefill.py \
  tests/test_moe_experts_prefill.py tests/test_model_cuda.py tests/test_*.py 2>/dev/null | awk '!seen[$0]++')}
: > "$out/tests.log"
tests_rc=0
for f in $files; do
  left=$(( tests_budget - ($(date +%s) - t1) ))
  if [ "$left" -lt 10 ]; then echo "NOT RUN (test time budget spent): $f" >> "$out/tests.log"; tests_rc=1; continue; fi
  limit=$(( left < 120 ? left : 120 ))
  echo "=== $f (limit ${limit}s)" >> "$out/tests.log"
  timeout "$limit" "$py" -m pytest "$f" -m cuda -v -p no:cacheprovider >> "$out/tests.log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "TIMED OUT after ${limit}s: $f" >> "$out/tests.log"
  [ $rc -eq 0 ] || [ $rc -eq 5 ] || tests_rc=1
done
echo "tests: rc=$tests_rc in $(( $(date +%s) - t1 )) s"; grep -E "^(=+ .*(passed|failed).*|TIMED OUT.*|NOT RUN.*)$" "$out/tests.log"

t2=$(date +%s)
timeout 105 "$py" bench/bench_kernels.py --quick --probe-seconds 10 --json "$out/bench_kernels.json" \
  > "$out/bench_kernels.log" 2>&1
kb_rc=$?
timeout 75 "$py" bench/bench_e2e.py --quick --json "$out/bench_e2e.json" > "$out/bench_e2e.log" 2>&1
e2e_rc=$?
echo "benchmarks: kernels rc=$kb_rc e2e rc=$e2e_rc in $(( $(date +%s) - t2 )) s"

"$py" bench/device_check_report.py "$out" --stamp "$stamp" --build-rc $build_rc --tests-rc $tests_rc \
  --bench-rc $kb_rc --e2e-rc $e2e_rc --seconds $(( $(date +%s) - t0 ))
# The device tool brings back at most 8 files: the benchmarks' JSON now lives inside results.json.
[ -s "$out/results.json" ] && rm -f "$out/bench_kernels.json" "$out/bench_e2e.json"
ls "$out"
