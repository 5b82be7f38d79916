// The emulation runtime's own known-answer kernels, independent of the project's kernels (tests/test_emu_runtime.py).
// Compiled like a kernel file (instrumented, -DMIXTRAL_EMU). Each `case` of run_selftest is one kernel; `arg` picks a
// correct variant (0) or a deliberately broken one whose report the tests check.
#include "emu/cuda_emu.h"
#include "emu/emu_host.h"

#include <string>

namespace {

// Every thread writes its slot, then reads its neighbour's. arg 0: a barrier between (correct); 1: none (a race).
__global__ void race_kernel(float* out, int arg) {
  MX_SHARED(float[64], s);
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);  // RACE-WRITE (the test finds this line)
  if (arg == 0) __syncthreads();
  const float v = s[(t + 1) % 64];  // RACE-READ
  out[t] = v;
}

// Two warps; each sums its 32 values with __shfl_xor_sync, scans them with __shfl_up_sync, broadcasts lane 3 of each
// 8-lane segment with __shfl_sync(width 8) and shifts with __shfl_down_sync; the block total goes through shared
// memory. x: [64], sums: [1], scan: [64], bcast: [64], down: [64].
__global__ void shfl_kernel(const float* x, float* sums, float* scan, float* bcast, float* down) {
  MX_SHARED(float[2], part);
  const int t = threadIdx.x, lane = t % 32;
  const float v = x[t];
  float s = v;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  float c = v;
  for (int o = 1; o < 32; o <<= 1) {
    const float u = __shfl_up_sync(0xffffffffu, c, o);
    if (lane >= o) c += u;
  }
  scan[t] = c;
  bcast[t] = __shfl_sync(0xffffffffu, v, 3, 8);
  down[t] = __shfl_down_sync(0xffffffffu, v, 5);
  if (lane == 0) part[t / 32] = s;
  __syncthreads();
  if (t == 0) sums[0] = part[0] + part[1];
}

// out[0..2] = ballot(p), any(p), all(p) over the lanes of mask, written by lane 0.
__device__ void vote(unsigned mask, bool p, int lane, unsigned* out) {
  const unsigned b = __ballot_sync(mask, p);
  const bool any = __any_sync(mask, p), all = __all_sync(mask, p);
  if (lane == 0) {
    out[0] = b;
    out[1] = any;
    out[2] = all;
  }
}

// x: [64] int; out: [2 warps][3] = ballot(x > 0), any(x > 0), all(x > 0); lanes of mask 0x0000ffff only for warp 1.
__global__ void ballot_kernel(const int* x, unsigned* out) {
  const int t = threadIdx.x, w = t / 32, lane = t % 32;
  const bool p = x[t] > 0;
  if (w == 0) {
    vote(0xffffffffu, p, lane, out);
  } else if (lane < 16) {
    vote(0x0000ffffu, p, lane, out + 3);
  }
}

// arg 0: every thread reaches the barrier; 1: only warp 0 does (a deadlock: warp 1 exits, warp 0 waits).
// 2: lane 7 of warp 1 goes to the barrier while the rest of its warp waits for it in a __syncwarp (nobody exits: a
// deadlock, reported with every thread's wait site).
__global__ void deadlock_kernel(float* out, int arg) {
  const int t = threadIdx.x;
  if (arg == 0 || (arg == 1 && t < 32)) {
    __syncthreads();
  } else if (arg == 2) {
    if (t / 32 != 1 || t % 32 == 7) __syncthreads();  // DEADLOCK-BARRIER
    else __syncwarp(0xffffffffu);                     // DEADLOCK-SYNCWARP
  }
  out[t] = 1.f;
}

// out: [n] floats; writes out[0 .. n + arg) (arg 1 writes one element past the end).
__global__ void oob_kernel(float* out, int n, int arg) {
  const int t = threadIdx.x;
  if (t < n + arg) out[t] = static_cast<float>(t);
}

// arg 0: full-warp shuffle; 1: lane 5 skips it and exits; 2: lane 5 calls a ballot instead (mismatched collectives).
__global__ void missing_lane_kernel(float* out, int arg) {
  const int t = threadIdx.x;
  float v = static_cast<float>(t);
  if (arg == 0 || t != 5) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else if (arg == 2) {
    v = static_cast<float>(__ballot_sync(0xffffffffu, true));
  }
  out[t] = v;
}

// cp.async semantics with the runtime primitives: each of 32 threads copies 32 bytes of x (8 floats) as two groups
// of 16 bytes; arg 1 copies the second group with src_bytes 8 (zero fill). Reads its shared row before any wait,
// after wait_group(1) and after wait_group(0). out: [3][32][8].
__global__ void cp_async_kernel(const float* x, float* out, int arg) {
  MX_SHARED_ALIGNED(16, float[32][8], s);
  const int t = threadIdx.x;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(&s[t][0]));
  ::emu::async_copy_global_to_shared(base, x + t * 8, 16, 16, "cp.async.cg.shared.global");
  ::emu::async_commit_group();
  ::emu::async_copy_global_to_shared(base + 16, x + t * 8 + 4, 16, arg == 1 ? 8 : 16, "cp.async.cg.shared.global");
  ::emu::async_commit_group();
  for (int i = 0; i < 8; ++i) out[(0 * 32 + t) * 8 + i] = s[t][i];
  ::emu::async_wait_group(1);
  for (int i = 0; i < 8; ++i) out[(1 * 32 + t) * 8 + i] = s[t][i];
  ::emu::async_wait_group(0);
  for (int i = 0; i < 8; ++i) out[(2 * 32 + t) * 8 + i] = s[t][i];
}

// out: [4][n] = rsqrtf(x), __expf(x), __fdividef(x, 3), expf(x), one element per thread.
__global__ void approx_kernel(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = x[i];
  out[0 * n + i] = rsqrtf(v);
  out[1 * n + i] = __expf(v);
  out[2 * n + i] = __fdividef(v, 3.0f);
  out[3 * n + i] = expf(v);
}

// x: [n] float -> bf: [n] bf16, hf: [n] fp16 (round to nearest even), and back: bf_back / hf_back [n] float.
__global__ void convert_kernel(const float* x, __nv_bfloat16* bf, __half* hf, float* bf_back, float* hf_back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __nv_bfloat16 b = __float2bfloat16(x[i]);
  const __half h = __float2half(x[i]);
  bf[i] = b;
  hf[i] = h;
  bf_back[i] = __bfloat162float(b);
  hf_back[i] = __half2float(h);
}

// Shared and global atomics from every thread (they do not race with each other); arg 1 adds a plain read of the
// shared counter by thread 0 without a barrier (a race with the other threads' atomics).
__global__ void atomic_kernel(int* global_count, float* out, int arg) {
  MX_SHARED(int, count);
  const int t = threadIdx.x;
  if (t == 0) count = 0;
  __syncthreads();
  atomicAdd(&count, 1);
  atomicAdd(global_count, 2);
  if (arg == 1 && t == 0) out[1] = static_cast<float>(count);
  __syncthreads();
  if (t == 0) out[0] = static_cast<float>(count);
}

// Lane 0 of each warp writes a value, lane 1 reads it. arg 0: __syncwarp between (ordered); 1: only a shuffle between
// (not ordered: a race).
__global__ void warp_order_kernel(float* out, int arg) {
  MX_SHARED(float[2], s);
  const int t = threadIdx.x, lane = t % 32, w = t / 32;
  if (lane == 0) s[w] = static_cast<float>(w + 10);
  if (arg == 0) __syncwarp();
  else (void)__shfl_sync(0xffffffffu, 0, 0);
  if (lane == 1) out[w] = s[w];
}

// Dynamic shared memory holds 0xFF bytes (NaN) at every CTA start: each CTA reads one slot before writing it.
// out: [grid] floats.
__global__ void fresh_smem_kernel(float* out) {
  MX_DYNAMIC_SHARED(float, dyn, 16);
  const int t = threadIdx.x;
  if (t == 0) {
    out[blockIdx.x] = dyn[3];
    dyn[3] = 1.f;
  }
}

// arg 0: a store through a wild pointer (outside every buffer and shared memory); 1: unbounded recursion (the
// thread's stack overflows); 2: a spin-wait on a shared flag that another thread sets (never, cooperatively).
__attribute__((noinline)) int recurse(volatile int* p, int n) {
  volatile char pad[512];
  pad[n % 512] = static_cast<char>(n);
  return recurse(p, n + 1) + pad[(n + 1) % 512];
}

__global__ void crash_kernel(float* out, int arg) {
  MX_SHARED(int, flag);
  const int t = threadIdx.x;
  if (t == 0) flag = 0;
  __syncthreads();
  if (arg == 0 && t == 1) *reinterpret_cast<volatile float*>(static_cast<uintptr_t>(64)) = 1.f;
  if (arg == 1 && t == 1) out[0] = static_cast<float>(recurse(reinterpret_cast<volatile int*>(out), 0));
  if (arg == 2 && t == 0)
    while (reinterpret_cast<volatile int&>(flag) == 0) {
    }
  if (arg == 2 && t == 1) flag = 1;
  out[t] = 1.f;
}

}  // namespace

namespace emu {

bool run_selftest(const std::string& name, void* const* b, int n, int64_t arg) {
  const int a = static_cast<int>(arg);
  auto f = [&](int i) { return static_cast<float*>(b[i]); };
  if (name == "race" && n == 1) launch(race_kernel, 1, 64, 0, nullptr, f(0), a);
  else if (name == "shfl" && n == 5) launch(shfl_kernel, 1, 64, 0, nullptr, f(0), f(1), f(2), f(3), f(4));
  else if (name == "ballot" && n == 2)
    launch(ballot_kernel, 1, 64, 0, nullptr, static_cast<const int*>(b[0]), static_cast<unsigned*>(b[1]));
  else if (name == "deadlock" && n == 1) launch(deadlock_kernel, 1, 96, 0, nullptr, f(0), a);
  else if (name == "oob" && n == 1) launch(oob_kernel, 1, 64, 0, nullptr, f(0), 40, a);
  else if (name == "missing_lane" && n == 1) launch(missing_lane_kernel, 1, 32, 0, nullptr, f(0), a);
  else if (name == "cp_async" && n == 2) launch(cp_async_kernel, 1, 32, 0, nullptr, f(0), f(1), a);
  else if (name == "approx" && n == 2) launch(approx_kernel, (a + 127) / 128, 128, 0, nullptr, f(0), f(1), a);
  else if (name == "convert" && n == 5)
    launch(convert_kernel, (a + 127) / 128, 128, 0, nullptr, f(0), static_cast<__nv_bfloat16*>(b[1]),
           static_cast<__half*>(b[2]), f(3), f(4), a);
  else if (name == "atomic" && n == 2) launch(atomic_kernel, 2, 64, 0, nullptr, static_cast<int*>(b[0]), f(1), a);
  else if (name == "warp_order" && n == 1) launch(warp_order_kernel, 1, 64, 0, nullptr, f(0), a);
  else if (name == "crash" && n == 1) launch(crash_kernel, 1, 32, 0, nullptr, f(0), a);
  else if (name == "fresh_smem" && n == 1) launch(fresh_smem_kernel, 3, 32, 64, nullptr, f(0));
  else return false;
  return true;
}

}  // namespace emu
