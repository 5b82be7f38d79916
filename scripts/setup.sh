#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with torch, the package (CUDA extension built when a toolkit is
# found) and the test extras. Idempotent: a second run only rebuilds what changed.
#   PYTHON=python3.11   interpreter for the venv (default python3)
#   TORCH_SPEC=...      torch requirement (default torch==2.14.1, a CUDA 13.0 build that compiles the extension)
#   MIXTRAL_EXT_CUDA=0  pure-Python install (1: fail if the extension cannot be built)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
export PATH="$PWD/.venv/bin:$PATH"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
pip_q() { python -m pip install --disable-pip-version-check -q "$@"; }
python -c 'import torch' 2>/dev/null || pip_q "${TORCH_SPEC:-torch==2.14.1}"
# --no-build-isolation builds with this venv's setuptools: it needs one with bdist_wheel built in (>= 70.1).
python -c 'import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1))' \
  2>/dev/null || pip_q "setuptools>=70.1"
command -v ninja >/dev/null || pip_q ninja
cmake_ok=$(python - <<'PY'
import re, shutil, subprocess
exe = shutil.which("cmake")
v = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout if exe else ""
m = re.search(r"(\d+)\.(\d+)", v)
print(int(bool(m and (3, 24) <= (int(m[1]), int(m[2])) < (4, 0))))
PY
)
[ "$cmake_ok" = 1 ] || pip_q "cmake>=3.24,<4"
MAX_JOBS=${MAX_JOBS:-$(nproc)} pip_q --no-build-isolation -e '.[test]'
python -c 'import mixtral_ext; print("mixtral_ext installed; CUDA extension:", mixtral_ext.EXTENSION_STATUS)'
