#!/usr/bin/env bash
# Incremental developer build of mixtral_ext/_C*.so (when a CUDA toolkit is there) and _emu*.so into build/dev
# (serialised with a lock: 2 cores are shared). MIXTRAL_EXT_CUDA=0: the emulation extension only.
# Usage: scripts/dev_build.sh [arch list, default "80;90a"]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
arch=${1:-${MIXTRAL_EXT_ARCH:-80;90a}}
suffix=$($py -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
nvcc=$(readlink -f "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" || true)
cuda_args=(-DMIXTRAL_EXT_WITH_CUDA=OFF)  # no toolkit (or MIXTRAL_EXT_CUDA=0): the emulation extension only
if [ "${MIXTRAL_EXT_CUDA:-auto}" != 0 ] && [ -x "$nvcc" ]; then
  cuda_args=(-DMIXTRAL_EXT_WITH_CUDA=ON
    -DCMAKE_PREFIX_PATH="$($py -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
    -DCMAKE_CUDA_COMPILER="$nvcc" -DCUDA_TOOLKIT_ROOT_DIR="$(dirname "$(dirname "$nvcc")")"
    -DMIXTRAL_EXT_ARCH="$arch" -DMIXTRAL_EXT_OUTPUT="$PWD/mixtral_ext/_C$suffix")
fi
exec 9>/tmp/mixtral_build.lock
flock 9
mkdir -p build
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(realpath -s "$(command -v "$py")")" \
  "${cuda_args[@]}" -DMIXTRAL_EXT_WITH_EMU="${MIXTRAL_EXT_EMU:-ON}" \
  -DMIXTRAL_EXT_EMU_OUTPUT="$PWD/mixtral_ext/_emu$suffix" > build/dev-configure.log 2>&1 \
  || { cat build/dev-configure.log; exit 1; }
cmake --build build/dev -j "${MAX_JOBS:-2}"
