// rms_norm: one block per row.
//
// Algorithm: (optional) r = round(x + residual), stored back to residual; ss = sum(r^2) in fp32 over the row
// (each thread a strided slice, warp shuffles, then one smem pass); out = round(round(r * rsqrt(ss/H + eps)) * w).
// The two roundings reproduce transformers' MixtralRMSNorm in bf16/fp16 (it casts the normalised value to the
// input dtype before multiplying by the weight), so the CUDA op matches the reference up to fp32 summation order.
// Layout: rows may be strided (a view of a larger buffer), the hidden dim must be contiguous. Vector path: 16-byte
// loads when H and the row strides are multiples of the vector width and the pointers are 16-byte aligned;
// otherwise a scalar path. The row is read twice; the second read hits L1/L2 (H <= 16k elements).
#include "rms_norm.h"
#include "device.cuh"

namespace mixtral {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(RmsNormParams p) {
  using V = Vec<T, VEC>;
  const int64_t row = blockIdx.x;
  const int64_t nvec = p.hidden / VEC;
  const V* x = reinterpret_cast<const V*>(static_cast<const T*>(p.x) + row * p.x_stride);
  const V* w = reinterpret_cast<const V*>(p.w);
  V* res = p.residual ? reinterpret_cast<V*>(static_cast<T*>(p.residual) + row * p.residual_stride) : nullptr;
  V* out = reinterpret_cast<V*>(static_cast<T*>(p.out) + row * p.hidden);

  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    V a = x[i];
    if (res) {
      V r = res[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) a.v[j] = from_float<T>(to_float(a.v[j]) + to_float(r.v[j]));
      res[i] = a;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = to_float(a.v[j]);
      ss += f * f;
    }
  }
  MX_SHARED(float[kThreads / 32], partial);
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) total += partial[i];
  // IEEE sqrt and division (0.5 ulp each), not rsqrtf: its documented 2 ulp error alone exceeds the fp32 output's
  // tolerance (2 ulp of the largest output) once the products' roundings add theirs. Once per row, so free.
  const float inv = 1.0f / sqrtf(total / static_cast<float>(p.hidden) + p.eps);

  // The residual row was written by this same thread above, so re-reading it needs no barrier.
  const V* src = res ? res : x;
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    V a = src[i];
    const V g = w[i];
    V o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float normed = to_float(from_float<T>(to_float(a.v[j]) * inv));
      o.v[j] = from_float<T>(normed * to_float(g.v[j]));
    }
    out[i] = o;
  }
}

template <typename T>
cudaError_t launch_typed(const RmsNormParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = p.hidden % kVec == 0 && p.x_stride % kVec == 0 &&
                       (p.residual == nullptr || p.residual_stride % kVec == 0) &&
                       (reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.w) |
                        reinterpret_cast<uintptr_t>(p.residual) | reinterpret_cast<uintptr_t>(p.out)) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(p.tokens));
  mixtral::launch(aligned ? rms_norm_kernel<T, kVec> : rms_norm_kernel<T, 1>, grid, kThreads, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_launch(const RmsNormParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) { return launch_typed<typename decltype(t)::type>(p, stream); });
}

}  // namespace mixtral
