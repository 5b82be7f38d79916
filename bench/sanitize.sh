#!/usr/bin/env bash
# compute-sanitizer over a small selection of the GPU tests (memcheck for every kernel family, racecheck on the
# shared-memory-heavy attention and GEMM kernels), for a GPU session with time left after device_check.sh.
# Writes sanitizer-<tool>.log into RESULTS_DIR (default bench/results/). Needs the extension built (device_check.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-bench/results}")
mkdir -p "$out"
py=${PYTHON:-python3}
san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # every allocation its own, so out-of-bounds accesses are caught
small="(opcheck or deterministic or graph or unaligned or skips_out_of_range or generic or empty or one_expert or
  mixed_batch or other_gqa or token_sweep) and not 4096 and not 8192 and not 16384 and not 32768"
small=$(echo $small)
memcheck_files="tests/test_rms_norm.py tests/test_rope_kv_append.py tests/test_moe_route.py tests/test_attention_decode.py
  tests/test_moe_experts.py tests/test_attention_prefill.py tests/test_moe_experts_prefill.py"
race_files="tests/test_attention_decode.py tests/test_attention_prefill.py tests/test_moe_experts_prefill.py"
rc=0
timeout "${SANITIZE_SECONDS:-240}" "$san" --tool memcheck --error-exitcode 17 "$py" -m pytest -q -m cuda \
  -p no:cacheprovider -k "$small" $memcheck_files > "$out/sanitizer-memcheck.log" 2>&1 || rc=1
timeout "${SANITIZE_SECONDS:-240}" "$san" --tool racecheck --error-exitcode 17 "$py" -m pytest -q -m cuda \
  -p no:cacheprovider -k "(opcheck or deterministic) and not 16384 and not 32768" $race_files \
  > "$out/sanitizer-racecheck.log" 2>&1 || rc=1
grep -hE "ERROR SUMMARY|passed|failed" "$out"/sanitizer-*.log
exit $rc
