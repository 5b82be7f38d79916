// rope_kv_append: rotate-half RoPE on q and k, k and v appended to the KV cache, in one launch for any T.
//
// Work item: one thread per (token t, head h of the Hq + 2 Hkv heads, chunk c of VEC columns of the first half).
// The thread loads x1 = x[c*VEC .. +VEC) and x2 = x[D/2 + c*VEC .. +VEC) of its head (16-byte loads on the vector
// path) and writes both halves of the result, so every element is read and written exactly once:
//   out1 = x1 * cos - x2 * sin,  out2 = x2 * cos + x1 * sin      (cos, sin = cos_sin[pos, c*VEC ..], fp32)
// q heads go to q_out[t, h], k heads (rotated) to k_cache[seq, pos, h - Hq], v heads (unrotated copy) to
// v_cache[seq, pos, h - Hq - Hkv], with seq = seq_ids[t], pos = positions[t].
//
// Numerics: fp32 with every product and sum rounded separately (__fmul_rn / __fadd_rn, no FMA contraction), in the
// order of reference.apply_rope (x * cos + rotate_half(x) * sin), then one rounding to the output dtype: the kernel
// reproduces the reference bit for bit given the same cos_sin table.
//
// Range contract: the caller guarantees 0 <= positions[t] < min(P, S) and 0 <= seq_ids[t] < B. The indices live on
// the device, so a violation cannot raise without a host sync; instead such a token is skipped: nothing is written
// to either cache, and its q row is written as zeros (defined output, no out-of-bounds access).
//
// Layout: all tensors contiguous. Vector path (VEC = 16 bytes / element size) when D/2 is a multiple of VEC and
// every pointer is 16-byte aligned; otherwise a scalar path (VEC = 1) with the same arithmetic.
#include "rope_kv_append.h"
#include "device.cuh"

namespace mixtral {
namespace {

constexpr int kThreads = 256;

// VEC fp32 values of one table row: float4 loads when VEC is a multiple of 4 (the rows are then 16-byte aligned).
template <int VEC>
__device__ __forceinline__ void load_table(const float* src, float (&dst)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i) {
      const float4 f = reinterpret_cast<const float4*>(src)[i];
      dst[4 * i] = f.x;
      dst[4 * i + 1] = f.y;
      dst[4 * i + 2] = f.z;
      dst[4 * i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = src[i];
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rope_kv_append_kernel(RopeKvAppendParams p) {
  using V = Vec<T, VEC>;
  const int half = p.head_dim / 2;
  const int chunks = half / VEC;
  const int heads = p.q_heads + 2 * p.kv_heads;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= p.tokens * heads * chunks) return;
  const int c = static_cast<int>(item % chunks);
  const int64_t th = item / chunks;
  const int h = static_cast<int>(th % heads);
  const int64_t t = th / heads;

  const int64_t pos = p.positions[t];
  const int64_t seq = p.seq_ids[t];
  const bool valid = pos >= 0 && pos < p.table_len && pos < p.cache_len && seq >= 0 && seq < p.batch;
  const int col = c * VEC;
  const T* src = static_cast<const T*>(p.qkv) + (t * heads + h) * p.head_dim + col;
  const int64_t slot = (seq * p.cache_len + pos) * p.kv_heads;  // cache row offset in heads, used only when valid

  if (h >= p.q_heads + p.kv_heads) {  // v: a plain copy
    if (!valid) return;
    T* dst = static_cast<T*>(p.v_cache) + (slot + h - p.q_heads - p.kv_heads) * p.head_dim + col;
    *reinterpret_cast<V*>(dst) = *reinterpret_cast<const V*>(src);
    *reinterpret_cast<V*>(dst + half) = *reinterpret_cast<const V*>(src + half);
    return;
  }
  T* dst = h < p.q_heads ? static_cast<T*>(p.q_out) + (t * p.q_heads + h) * p.head_dim + col
                         : static_cast<T*>(p.k_cache) + (slot + h - p.q_heads) * p.head_dim + col;
  if (!valid) {
    if (h < p.q_heads) {
      V z;
#pragma unroll
      for (int i = 0; i < VEC; ++i) z.v[i] = from_float<T>(0.f);
      *reinterpret_cast<V*>(dst) = z;
      *reinterpret_cast<V*>(dst + half) = z;
    }
    return;
  }
  const V x1 = *reinterpret_cast<const V*>(src);
  const V x2 = *reinterpret_cast<const V*>(src + half);
  float cs[VEC], sn[VEC];
  load_table<VEC>(p.cos_sin + pos * p.head_dim + col, cs);
  load_table<VEC>(p.cos_sin + pos * p.head_dim + half + col, sn);
  V o1, o2;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float a = to_float(x1.v[i]);
    const float b = to_float(x2.v[i]);
    o1.v[i] = from_float<T>(__fadd_rn(__fmul_rn(a, cs[i]), -__fmul_rn(b, sn[i])));
    o2.v[i] = from_float<T>(__fadd_rn(__fmul_rn(b, cs[i]), __fmul_rn(a, sn[i])));
  }
  *reinterpret_cast<V*>(dst) = o1;
  *reinterpret_cast<V*>(dst + half) = o2;
}

template <typename T>
cudaError_t launch_typed(const RopeKvAppendParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int half = p.head_dim / 2;
  const bool aligned = half % kVec == 0 &&
                       (reinterpret_cast<uintptr_t>(p.qkv) | reinterpret_cast<uintptr_t>(p.cos_sin) |
                        reinterpret_cast<uintptr_t>(p.k_cache) | reinterpret_cast<uintptr_t>(p.v_cache) |
                        reinterpret_cast<uintptr_t>(p.q_out)) % 16 == 0;
  const int vec = aligned ? kVec : 1;
  const int64_t items = p.tokens * (p.q_heads + 2 * p.kv_heads) * (half / vec);
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  mixtral::launch(aligned ? rope_kv_append_kernel<T, kVec> : rope_kv_append_kernel<T, 1>, grid, kThreads, 0, stream,
                  p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rope_kv_append_launch(const RopeKvAppendParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  if (p.head_dim <= 0 || p.head_dim % 2 != 0 || p.q_heads <= 0 || p.kv_heads <= 0) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return launch_typed<typename decltype(t)::type>(p, stream); });
}

}  // namespace mixtral
