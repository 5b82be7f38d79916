// Device helpers shared by the kernels: the platform layer (CUDA, or the CPU emulation build with -DMIXTRAL_EMU),
// shared-memory declaration macros, the one kernel-launch helper, dtype conversions, warp and quad reductions, the
// aligned vector type, and the launchers' DType -> element type dispatch. Every kernel file includes this first
// (directly or through its own headers); nothing CUDA-specific enters a kernel file any other way. Inline PTX lives
// only in arch/*.cuh.
//
// Shared memory is declared through macros so that the emulation runtime can give each CTA its own copy:
//   MX_SHARED(type, name);                   static, e.g. MX_SHARED(float[kWarps][32], s_part);
//   MX_SHARED_ALIGNED(align, type, name);    static with an alignment
//   MX_DYNAMIC_SHARED(type, name, align);    the dynamic buffer (extern __shared__ type name[])
// and kernels are launched with mixtral::launch(kernel, grid, block, smem_bytes, stream, args...), never <<<>>>.
// Call it qualified: an unqualified call would also find the emulator's launch by argument-dependent lookup.
#pragma once

#ifdef MIXTRAL_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

namespace mixtral {
// Lets an array type be written as one macro argument: mx_type<float[4][32]> name  ==  float name[4][32].
template <class T> using mx_type = T;

template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch: argument count differs from the kernel's");
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
}
}  // namespace mixtral

#define MX_SHARED(type, name) __shared__ ::mixtral::mx_type<type> name
#define MX_SHARED_ALIGNED(align, type, name) __shared__ __align__(align) ::mixtral::mx_type<type> name
#define MX_DYNAMIC_SHARED(type, name, align) extern __shared__ __align__(align) type name[]
#endif  // MIXTRAL_EMU

#include "common.h"

namespace mixtral {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// 1 / x, or 0 where x is not positive: an attention row with no visible key has a softmax denominator of 0 and
// gets a zero output, not NaN.
__device__ __forceinline__ float inv_or_zero(float x) { return x > 0.f ? 1.f / x : 0.f; }

// N elements of T as one aligned unit: a single 16-byte load / store when sizeof(T) * N == 16.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Over the 4 lanes of a quad (lanes 4g .. 4g+3): the lanes that share one row of an mma / wgmma accumulator.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return v;
}

// The host side of a launcher: the one place a DType tag becomes an element type. Calls f(TypeTag<T>{}) for the
// tag's T and returns its result, e.g.
//   return dispatch_dtype(p.dtype, [&](auto t) { return launch_typed<typename decltype(t)::type>(p, stream); });
// cudaErrorInvalidValue for a tag outside DType. For launchers instantiated for all three dtypes.
template <typename T> struct TypeTag { using type = T; };

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(TypeTag<float>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    case DType::kFloat16: return f(TypeTag<__half>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace mixtral
