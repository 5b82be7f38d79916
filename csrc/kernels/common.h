// Host-visible types shared by the launchers' headers and the binding. Nothing here includes torch, and nothing
// here is device code (that lives in device.cuh, included only by .cu files).
#pragma once
#ifdef MIXTRAL_EMU
#include "emu/cuda_emu.h"  // cudaStream_t, cudaError_t in the CPU emulation build
#else
#include <cuda_runtime.h>
#endif
#include <cstdint>

namespace mixtral {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace mixtral
