// Known-answer kernels of the emulated Hopper instructions, through the same arch/sm90.cuh wrappers the kernels use
// (tests/test_emu_sm90.py checks them against float math and the documented layouts). Compiled like a kernel file
// (instrumented, -DMIXTRAL_EMU). `arg` picks the correct variant (0) or a deliberately broken one.
#include "kernels/arch/sm90.cuh"

#include <string>

namespace {
using namespace mixtral;
using namespace mixtral::sm90;

// Byte offset of element (r, c) in a [rows][64] 16-bit tile stored with the 128-byte swizzle (1024-aligned base):
// 16-byte chunk c / 8 of row r at chunk (c / 8) ^ (r % 8) (the CUDA programming guide's 128B swizzle pattern).
__device__ uint32_t sw128(int r, int c) {
  return static_cast<uint32_t>(r * 128 + ((((c >> 3) ^ (r & 7)) & 7) << 4) + (c & 7) * 2);
}

// D [64][N] fp32 = A [64][64] * B [N][64]^T, both K-major, 128B-swizzled in shared memory, 4 wgmma (k16 steps) of
// one group. 128 threads. arg bit 1: no fence.proxy.async after the generic stores; bit 2: read D before the wait;
// bit 4: no wgmma.fence.
template <typename T, int N>
__global__ void wgmma_ss_kernel(const T* a, const T* b, float* d_out, int arg) {
  MX_DYNAMIC_SHARED(uint8_t, smem, 1024);
  const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
  const uint32_t sa = base, sb = base + 64 * 128;
  const int t = threadIdx.x;
  uint8_t* p = smem + (base - smem_u32(smem));
  for (int i = t; i < 64 * 64; i += 128) *reinterpret_cast<T*>(p + sw128(i / 64, i % 64)) = a[i];
  for (int i = t; i < N * 64; i += 128) *reinterpret_cast<T*>(p + 64 * 128 + sw128(i / 64, i % 64)) = b[i];
  if (!(arg & 1)) fence_proxy_async();
  __syncthreads();
  float d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
  if (!(arg & 4)) wgmma_fence();
  for (int kk = 0; kk < 4; ++kk) {
    if constexpr (N == 256) wgmma_m64n256k16_f32_ss<T>(d, desc_sw128_kmajor(sa + kk * 32), desc_sw128_kmajor(sb + kk * 32), kk > 0);
    else wgmma_m64n128k16_f32_ss<T>(d, desc_sw128_kmajor(sa + kk * 32), desc_sw128_kmajor(sb + kk * 32), kk > 0);
  }
  wgmma_commit();
  float early[N / 2];
  for (int i = 0; i < N / 2; ++i) early[i] = d[i];
  wgmma_wait<0>();
  const float* src = (arg & 2) ? early : d;
  const int w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int j = 0; j < N / 8; ++j)
    for (int e = 0; e < 4; ++e) d_out[(16 * w + g + 8 * (e / 2)) * N + 8 * j + 2 * q + (e & 1)] = src[4 * j + e];
}

// D [64][64] fp32 = A [64][64] (registers, the m16n8k16 A fragment per warp) * B [64 keys][64] (shared, N-major,
// 128B swizzle: key row k at k * 128, dims swizzled within the row; 8-key groups 1024 bytes apart), 4 wgmma.
// 128 threads. arg bit 1: change the A registers between issue and wait.
template <typename T>
__global__ void wgmma_rs_kernel(const T* a, const T* b, float* d_out, int arg) {
  MX_DYNAMIC_SHARED(uint8_t, smem, 1024);
  const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  uint8_t* p = smem + (base - smem_u32(smem));
  for (int i = t; i < 64 * 64; i += 128) *reinterpret_cast<T*>(p + sw128(i / 64, i % 64)) = b[i];
  fence_proxy_async();
  __syncthreads();
  auto pack = [&](int r, int c) {
    const T lo = a[r * 64 + c], hi = a[r * 64 + c + 1];
    uint16_t l, h;
    std::memcpy(&l, &lo, 2);
    std::memcpy(&h, &hi, 2);
    return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
  };
  uint32_t af[4][4];
  for (int kk = 0; kk < 4; ++kk) {
    const int r = 16 * w + g, c = 16 * kk + 2 * q;
    af[kk][0] = pack(r, c);
    af[kk][1] = pack(r + 8, c);
    af[kk][2] = pack(r, c + 8);
    af[kk][3] = pack(r + 8, c + 8);
  }
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
  wgmma_fence();
  for (int kk = 0; kk < 4; ++kk) wgmma_m64n64k16_f32_rs_transb<T>(d, af[kk], desc_sw128_nmajor(base + kk * 2048));
  wgmma_commit();
  if (arg & 1) af[0][0] ^= 0x1u;
  wgmma_wait<0>();
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) d_out[(16 * w + g + 8 * (e / 2)) * 64 + 8 * j + 2 * q + (e & 1)] = d[4 * j + e];
}

// TMA: the box of `rows` x 64 elements at (x, y) of `map` into shared memory (128B swizzle), then every thread
// un-swizzles with the documented pattern into out [rows][64]. 128 threads. arg bit 1: expect_tx one 16-byte
// chunk short (the phase completes too early or never); bit 2: wait on the wrong parity.
template <typename T>
__global__ void tma_kernel(const __grid_constant__ CUtensorMap map, T* out, int x, int y, int rows, int arg) {
  MX_DYNAMIC_SHARED(uint8_t, smem, 1024);
  MX_SHARED_ALIGNED(8, uint64_t, bar);
  const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
  const uint32_t b = smem_u32(&bar);
  uint8_t* p = smem + (base - smem_u32(smem));
  if (threadIdx.x == 0) {
    mbar_init(b, 1);
    fence_mbarrier_init_release_cluster();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(b, rows * 128 - ((arg & 1) ? 16 : 0));
    cp_async_bulk_tensor_2d_global_to_shared(base, &map, x, y, b);
  }
  mbar_wait(b, (arg & 2) ? 1 : 0);
  for (int i = threadIdx.x; i < rows * 64; i += blockDim.x) out[i] = *reinterpret_cast<T*>(p + sw128(i / 64, i % 64));
}

// mbarrier ring: warp 0 produces `iters` values through a 2-slot ring (plain stores; full[s] count 32), warp 1
// consumes them (empty[s] count 32) into out[iters][32]. arg 1: the consumer waits on the wrong parity; 2: full's
// count is 31 (one arrival too many per phase); 3: the producer never arrives on its last slot (deadlock).
__global__ void mbar_ring_kernel(float* out, int iters, int arg) {
  MX_SHARED(float[2][32], slot);
  MX_SHARED_ALIGNED(8, uint64_t[2], full);
  MX_SHARED_ALIGNED(8, uint64_t[2], empty);
  const int t = threadIdx.x, lane = t % 32;
  if (t == 0) {
    for (int s = 0; s < 2; ++s) {
      mbar_init(smem_u32(&full[s]), arg == 2 ? 31 : 32);
      mbar_init(smem_u32(&empty[s]), 32);
    }
  }
  __syncthreads();
  if (t < 32) {
    for (int i = 0; i < iters; ++i) {
      const int s = i % 2;
      mbar_wait(smem_u32(&empty[s]), ((i / 2) & 1) ^ 1);
      slot[s][lane] = static_cast<float>(i * 100 + lane);
      if (!(arg == 3 && i == iters - 1)) mbar_arrive(smem_u32(&full[s]));
    }
  } else {
    for (int i = 0; i < iters; ++i) {
      const int s = i % 2;
      mbar_wait(smem_u32(&full[s]), ((i / 2) & 1) ^ (arg == 1 ? 1 : 0));
      out[i * 32 + lane] = slot[s][lane];
      mbar_arrive(smem_u32(&empty[s]));
    }
  }
}

// setmaxnreg: warpgroup 0 gives registers back (.dec to dec_to), warpgroup 1 then asks for 232 (.inc); with the
// kernel's numRegs R the pool balances iff 128 (R - dec_to) >= 128 (232 - R). Named barriers: warpgroup 1 hands a
// value to warpgroup 0 through shared memory with bar.arrive / bar.sync (barrier 1, 256 threads). out[256].
__global__ void regs_kernel(float* out, int dec_to) {
  MX_SHARED(float[128], s);
  const int t = threadIdx.x;
  if (t < 128) {
    if (dec_to == 40) setmaxnreg_dec<40>();
    else if (dec_to == 104) setmaxnreg_dec<104>();
    else setmaxnreg_dec<160>();
    bar_sync<256>(1);
    out[t] = s[t];
  } else {
    setmaxnreg_inc<232>();
    s[t - 128] = static_cast<float>(t);
    bar_arrive<256>(1);
    out[t] = 1.f;
  }
}

}  // namespace

namespace emu {
namespace sm90 {

bool run_selftest(const std::string& name, void* const* b, int n, const int64_t* args, int nargs) {
  auto arg = [&](int i) { return i < nargs ? static_cast<int>(args[i]) : 0; };
  auto f = [&](int i) { return static_cast<float*>(b[i]); };
  const bool f16 = arg(1) != 0;
  if ((name == "wgmma_ss128" || name == "wgmma_ss256") && n == 3) {
    auto run = [&](auto kernel, auto tag, size_t smem) {
      using T = decltype(tag);
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      mixtral::launch(kernel, 1, 128, smem, nullptr, static_cast<const T*>(b[0]), static_cast<const T*>(b[1]), f(2),
                      arg(0));
    };
    const size_t smem = 1024 + 64 * 128 + (name == "wgmma_ss128" ? 128 : 256) * 128;
    if (name == "wgmma_ss128") {
      if (f16) run(wgmma_ss_kernel<__half, 128>, __half{}, smem);
      else run(wgmma_ss_kernel<__nv_bfloat16, 128>, __nv_bfloat16{}, smem);
    } else {
      if (f16) run(wgmma_ss_kernel<__half, 256>, __half{}, smem);
      else run(wgmma_ss_kernel<__nv_bfloat16, 256>, __nv_bfloat16{}, smem);
    }
  } else if (name == "wgmma_rs" && n == 3) {
    const size_t smem = 1024 + 64 * 128;
    if (f16)
      mixtral::launch(wgmma_rs_kernel<__half>, 1, 128, smem, nullptr, static_cast<const __half*>(b[0]),
                      static_cast<const __half*>(b[1]), f(2), arg(0));
    else
      mixtral::launch(wgmma_rs_kernel<__nv_bfloat16>, 1, 128, smem, nullptr, static_cast<const __nv_bfloat16*>(b[0]),
                      static_cast<const __nv_bfloat16*>(b[1]), f(2), arg(0));
  } else if (name == "tma" && n == 2) {
    // b[0]: the global [R][C] bf16 tensor (R = args[2], C = args[3]), b[1]: out [rows][64]; args: arg, f16, R, C,
    // x, y, rows.
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &q) != cudaSuccess || !fn)
      return false;
    using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
    const cuuint64_t dims[2] = {static_cast<cuuint64_t>(arg(3)), static_cast<cuuint64_t>(arg(2))};
    const cuuint64_t strides[1] = {static_cast<cuuint64_t>(arg(3)) * 2};
    const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(arg(6))};
    const cuuint32_t es[2] = {1, 1};
    CUtensorMap map;
    const CUresult r = reinterpret_cast<Encode>(fn)(
        &map, f16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, b[0], dims, strides, box,
        es, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) return false;
    const size_t smem = 1024 + static_cast<size_t>(arg(6)) * 128;
    cudaFuncSetAttribute(tma_kernel<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    mixtral::launch(tma_kernel<__nv_bfloat16>, 1, 128, smem, nullptr, map, static_cast<__nv_bfloat16*>(b[1]), arg(4),
                    arg(5), arg(6), arg(0));
  } else if (name == "mbar_ring" && n == 1) {
    mixtral::launch(mbar_ring_kernel, 1, 64, 0, nullptr, f(0), arg(2), arg(0));
  } else if (name == "regs" && n == 1) {
    mixtral::launch(regs_kernel, 1, 256, 0, nullptr, f(0), arg(0));
  } else {
    return false;
  }
  return true;
}

}  // namespace sm90
}  // namespace emu
