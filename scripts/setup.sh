#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with torch, the package (CUDA extension built when a toolkit is
# found) and the test extras. Idempotent: a second run only rebuilds what changed.
#   PYTHON=python3.11   interpreter for the venv (default python3)
#   TORCH_SPEC=...      torch requirement (default torch==2.14.1, a CUDA 13.0 build that compiles the extension)
#   MIXTRAL_EXT_CUDA=0  no CUDA extension (1: fail if it cannot be built)
#   MIXTRAL_EXT_EMU=0   no emulation extension (the kernels on the CPU; 1: fail if it cannot be built)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
step() { echo "==> $*" >&2; }  # a line before each step that can take a while
[ -x .venv/bin/python ] || { step "creating the virtualenv .venv ($py)"; "$py" -m venv .venv; }
export PATH="$PWD/.venv/bin:$PATH"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
pip_q() { python -m pip install --disable-pip-version-check -q "$@"; }
python -c 'import torch' 2>/dev/null || {
  step "installing ${TORCH_SPEC:-torch==2.14.1}: about 3 GB to download with its CUDA libraries (5.7 GB installed)," \
       "minutes on a slow link"
  pip_q "${TORCH_SPEC:-torch==2.14.1}"; }
# --no-build-isolation builds with this venv's setuptools: it needs one with bdist_wheel built in (>= 70.1).
python -c 'import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1))' \
  2>/dev/null || { step "installing setuptools>=70.1"; pip_q "setuptools>=70.1"; }
command -v ninja >/dev/null || { step "installing ninja"; pip_q ninja; }
cmake_ok=$(python - <<'PY'
import re, shutil, subprocess
exe = shutil.which("cmake")
v = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout if exe else ""
m = re.search(r"(\d+)\.(\d+)", v)
print(int(bool(m and (3, 24) <= (int(m[1]), int(m[2])) < (4, 0))))
PY
)
[ "$cmake_ok" = 1 ] || { step "installing cmake>=3.24,<4"; pip_q "cmake>=3.24,<4"; }
if [ -n "${CUDA_HOME:-}" ] && [ "${MIXTRAL_EXT_CUDA:-}" != 0 ]; then
  step "building the package, its CUDA kernels with $CUDA_HOME/bin/nvcc and their CPU emulation," \
       "MAX_JOBS=${MAX_JOBS:-$(nproc)} (about 2 minutes on 2 cores, the emulation under a minute more), and installing" \
       "the test extras"
else
  step "installing the package (no CUDA kernels: no CUDA toolkit found or MIXTRAL_EXT_CUDA=0; the kernels' CPU" \
       "emulation is built, under a minute on 2 cores) and the test extras"
fi
MAX_JOBS=${MAX_JOBS:-$(nproc)} pip_q --no-build-isolation -e '.[test]'
python -c 'import mixtral_ext, mixtral_ext.emu as e; print("mixtral_ext installed; CUDA extension:",
  mixtral_ext.EXTENSION_STATUS, "; emulation:", "available" if e.available() else e.status())'
