// moe_experts, grouped expert GEMM, Hopper path (sm_90a): TMA loads into a 128B-swizzled multi-stage mbarrier
// ring, wgmma from shared memory, warp specialisation (one producer warpgroup, two consumer warpgroups, setmaxnreg).
//
// Algorithm: persistent blocks (one per SM; 192 KB of shared memory) walk the tile list of moe_experts_common.cuh; a
// tile is 128 rows x BN columns, K walked in 64-wide k-tiles. BN = 256 with a 4-deep ring of 48 KB slots, or BN = 128
// with a 6-deep ring of 32 KB slots when 256-wide tiles would make fewer than two waves over the SMs (GEMM2 at a few
// hundred tokens); fewer stages where the device has less shared memory. One thread of the producer warpgroup waits
// for a free ring slot (empty barrier), arms the slot's full barrier with the byte count and issues two TMA copies
// (A: 128 x 64, B: BN x 64, bf16 or fp16); the two consumer warpgroups each own 64 rows x BN columns and issue 4
// wgmma.m64nBNk16 per k-tile with A and B read from shared memory (BN/2 fp32 accumulators per thread), keep one
// wgmma group in flight, and release a slot once the group that read it has completed. The epilogue goes from
// registers to global memory. Producer and consumers walk the same (tile, k-tile) sequence, so their ring positions
// agree without messages.
//
// Gather: TMA's tiled mode copies boxes of consecutive rows and cannot gather the rows of x that an expert's tile
// needs. So GEMM1 first copies x into expert order, x_perm[r] = x[sorted_tokens[r]] (moe_experts_gather_rows_kernel),
// and TMA reads A boxes from x_perm. That costs one extra read + write of R x H elements (~1% of GEMM1's time at
// T = 4096, Mixtral shapes) and buys a fully asynchronous single-thread producer; the alternative (four producer warps issuing
// per-row 16-byte cp.async into the swizzled layout) would use more issue slots and registers in the producer. The
// copy lives in out_rows, which GEMM2 overwrites afterwards: R*H 16-bit values fit in its R*H fp32, and GEMM2 reads
// only inter and w2, so no extra workspace is needed. GEMM2's A (inter) is already in expert order.
//
// Edges: TMA zero-fills everything outside the tensor (k past K, rows past R or past E*N); rows of the next expert
// that fall in a tile's last M-box and weight rows of the next expert in the last N-box are multiplied but never
// stored (each output row/column depends only on its own A row/B row).
//
// Layouts (PTX ISA, "Shared Memory Matrix Layout" / "Matrix Descriptor", wgmma .bf16 / .f16, operands K-major):
//   Shared tile = rows of 64 16-bit elements = 128 bytes. TMA with CU_TENSOR_MAP_SWIZZLE_128B stores 16-byte
//   chunk c of row r at chunk c ^ (r % 8) within the row, the XOR taken from address bits [7,10) into bits [4,7); the
//   pattern repeats every 8 rows = 1024 bytes, so every tile base is 1024-byte aligned (then the descriptor's base
//   offset, bits 49-51, is 0).
//   Descriptor (64 bits): bits 0-13 start address >> 4; bits 16-29 leading-dimension byte offset >> 4 (unused for
//   swizzled K-major layouts: set to 1); bits 32-45 stride-dimension byte offset >> 4 = 1024 >> 4 (the distance
//   between consecutive 8-row core-matrix groups); bits 62-63 swizzle mode, 1 = 128-byte swizzle.
//   K steps inside a 64-wide k-tile: the k16 step kk starts kk * 32 bytes into the row; the hardware applies the
//   same address-bit XOR, so advancing the start address by kk * 32 (>> 4: +2 kk) selects logical columns
//   16 kk .. 16 kk + 15 of every row.
//   Accumulator D of m64nNk16 (fp32), thread i of the warpgroup, warp w = i / 32, g = lane / 4, t = lane % 4:
//   d[4j + 0, 1] = (row 16 w + g, columns 8 j + 2t, + 1), d[4j + 2, 3] = (row 16 w + g + 8, same columns),
//   j = 0 .. N/8 - 1: per 8-column block the same as mma.sync's C fragment, so the epilogues are shared.
//
// Limits: K, N multiples of 8 (TMA needs 16-byte row strides), E <= 256, rows < 2^31. Numerics as the sm80 path:
// fp32 accumulation, GEMM1 rounds silu(gate) * up to the element type (bf16 or fp16), GEMM2 writes fp32.
#include <algorithm>
#include <type_traits>

#include "moe_experts_common.cuh"
#include "arch/sm90.cuh"  // also CUtensorMap and the driver types of its encoding

namespace mixtral {
namespace moe_experts {

namespace {

// x_perm[r, :] = x[sorted_tokens[r], :], 16 bytes per thread per step (H is a multiple of 8).
__global__ void moe_experts_gather_rows_kernel(const uint4* __restrict__ x, const int* __restrict__ sorted_tokens,
                                               uint4* __restrict__ out, int64_t rows, int vec_per_row) {
  const int64_t total = rows * vec_per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / vec_per_row;
    const int64_t c = i - r * vec_per_row;
    out[i] = x[static_cast<int64_t>(__ldg(sorted_tokens + r)) * vec_per_row + c];
  }
}

constexpr int kThreads = 384;  // warpgroup 0: producer; 1, 2: consumers
// setmaxnreg targets (registers per thread) of the producer and consumer warpgroups; see regs_ok.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
constexpr int kBM = 128;
constexpr int kBK = 64;
constexpr int kABytes = kBM * kBK * 2;  // 16 KB
template <int BN>
constexpr int b_bytes() {
  return BN * kBK * 2;  // 32 KB (BN = 256) or 16 KB (BN = 128): multiples of 1024, so every slot stays aligned
}

template <int BN, int STAGES>
constexpr int sm90_smem_bytes() {
  return STAGES * (kABytes + b_bytes<BN>()) + 1024;  // + slack to align the ring to 1024 bytes
}

#ifdef MIXTRAL_SM90A
using namespace sm90;

// Every wait here (producer and consumers alike) has the watchdog of arch/sm90.cuh: any legitimate wait lasts at most
// one k-tile load or one epilogue, and a protocol bug (e.g. a transaction count TMA never delivers) traps instead of
// hanging the process and everything queued behind it. The timer is read once per 4096 failed polls, which keeps
// it off the consumers' fast path.
__device__ __forceinline__ void mbar_wait_watchdog(uint32_t bar, uint32_t parity) {
  bool done;
  uint32_t spins = 0;
  uint64_t t0 = 0;
  do {
    done = mbar_try_wait(bar, parity);
    if (!done && (++spins & 4095u) == 0) {
      const uint64_t now = globaltimer_ns();
      if (t0 == 0) t0 = now;
      else if (now - t0 > kWatchdogNs) __trap();
    }
  } while (!done);
}

// d[0 .. BN/2) += A(64 x 16, smem) * B(BN x 16, smem)^T, both K-major, fp32 accumulators; T = bf16 or fp16.
template <typename T, int BN>
__device__ __forceinline__ void wgmma_tile(float (&d)[BN / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(BN == 128 || BN == 256, "BN must be 128 or 256");
  if constexpr (BN == 256)
    wgmma_m64n256k16_f32_ss<T>(d, desc_a, desc_b, 1);
  else
    wgmma_m64n128k16_f32_ss<T>(d, desc_a, desc_b, 1);
}

#endif

// SWIGLU: GEMM1 (A = x_perm, silu(gate)*up epilogue into inter T [R, N/2]); else GEMM2 (fp32 out [R, N]).
template <typename T, int BN, int STAGES, bool SWIGLU>
__global__ void __launch_bounds__(kThreads, 1)
    moe_experts_sm90_kernel(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,
                         GemmArgs g) {
#ifdef MIXTRAL_SM90A
  static_assert(STAGES >= 3, "at least 3 stages");
  constexpr int kBBytes = b_bytes<BN>();
  constexpr int kStageBytes = kABytes + kBBytes;
  constexpr int kAcc = BN / 2;  // fp32 accumulators per thread: 64 x BN over 128 threads
  MX_DYNAMIC_SHARED(unsigned char, smem_raw, 16);
  MX_SHARED(int[kMaxExperts + 1], s_off);
  MX_SHARED(int[kMaxExperts + 1], s_tiles);
  MX_SHARED_ALIGNED(8, uint64_t[STAGES], full_bar);
  MX_SHARED_ALIGNED(8, uint64_t[STAGES], empty_bar);

  const uint32_t ring = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sA = ring;                       // STAGES x [128][64] T
  const uint32_t sB = ring + STAGES * kABytes;    // STAGES x [BN][64] T (1024-aligned: kABytes is 16 KB)

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(smem_u32(&full_bar[s]), 1);   // the producer's arrive.expect_tx (+ the TMA bytes)
      mbar_init(smem_u32(&empty_bar[s]), 8);  // one arrive per consumer warp
    }
    fence_mbarrier_init_release_cluster();
  }
  const int ntiles = (g.n + BN - 1) / BN;
  build_schedule(g, kBM, ntiles, s_off, s_tiles);  // its barriers also publish the initialised mbarriers
  const int total = s_tiles[g.experts];
  const int ktiles = (g.k + kBK - 1) / kBK;
  const int wg = threadIdx.x / 128;

  if (wg == 0) {
    setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0) {
      prefetch_tensormap(&tm_a);
      prefetch_tensormap(&tm_b);
      int stage = 0;
      uint32_t phase = 0;
      int e = 0;
      for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
        const Tile tl = decode_tile(tile, e, kBM, BN, s_off, s_tiles);
        const int b_row = tl.e * g.n + tl.n0;  // row of the [E*N, K] weight view
        for (int kt = 0; kt < ktiles; ++kt) {
          mbar_wait_watchdog(smem_u32(&empty_bar[stage]), phase ^ 1);
          const uint32_t fb = smem_u32(&full_bar[stage]);
          mbar_arrive_expect_tx(fb, kStageBytes);  // whole boxes count, zero-filled parts included
          cp_async_bulk_tensor_2d_global_to_shared(sA + stage * kABytes, &tm_a, kt * kBK, tl.m0, fb);
          cp_async_bulk_tensor_2d_global_to_shared(sB + stage * kBBytes, &tm_b, kt * kBK, b_row, fb);
          if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    const int c = wg - 1;                 // consumer: rows 64c .. 64c+63 of each tile
    const int warp = (threadIdx.x / 32) & 3;
    const int lane = threadIdx.x & 31;
    int stage = 0;
    uint32_t phase = 0;
    int e = 0;
    for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
      const Tile tl = decode_tile(tile, e, kBM, BN, s_off, s_tiles);
      float d[kAcc];
#pragma unroll
      for (int i = 0; i < kAcc; ++i) d[i] = 0.f;
      keep_regs(d);
      int prev = -1;
      for (int kt = 0; kt < ktiles; ++kt) {
        mbar_wait_watchdog(smem_u32(&full_bar[stage]), phase);
        wgmma_fence();  // orders the accumulator writes above (zeroing) before the asynchronous reads
        const uint64_t da = desc_sw128_kmajor(sA + stage * kABytes + c * 64 * 128);
        const uint64_t db = desc_sw128_kmajor(sB + stage * kBBytes);
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk) wgmma_tile<T, BN>(d, da + 2 * kk, db + 2 * kk);
        wgmma_commit();
        // At most the group just issued is still running: the previous k-tile's slot is no longer read.
        wgmma_wait<1>();
        if (prev >= 0) {
          __syncwarp();
          if (lane == 0) mbar_arrive(smem_u32(&empty_bar[prev]));
        }
        prev = stage;
        if (++stage == STAGES) {
          stage = 0;
          phase ^= 1;
        }
      }
      wgmma_wait<0>();
      keep_regs(d);
      if (prev >= 0) {
        __syncwarp();
        if (lane == 0) mbar_arrive(smem_u32(&empty_bar[prev]));
      }

      const int grp = lane >> 2;
      const int tig = lane & 3;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = tl.m0 + c * 64 + warp * 16 + grp + 8 * h;
        const bool row_ok = r < tl.m_end;
        if constexpr (SWIGLU) {
          T* out_row = static_cast<T*>(g.out) + static_cast<int64_t>(r) * (g.n / 2);
#pragma unroll
          for (int j = 0; j < BN / 8; j += 2) {
            const int nb = tl.n0 + j * 8;  // multiple of 16, as N: both 8-column blocks are in or out
            store_swiglu_pair(out_row, nb, d[4 * j + 2 * h], d[4 * j + 2 * h + 1], d[4 * j + 4 + 2 * h],
                              d[4 * j + 4 + 2 * h + 1], row_ok && nb < g.n);
          }
        } else {
          float* out_row = static_cast<float*>(g.out) + static_cast<int64_t>(r) * g.n;
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) {
            const int n = tl.n0 + j * 8 + 2 * tig;
            store_f32_pair(out_row, n, d[4 * j + 2 * h], d[4 * j + 2 * h + 1], row_ok && n < g.n);
          }
        }
      }
    }
  }
#endif
}

// ---- host: tensor maps through the driver entry point (the extension does not link libcuda) ------------------------

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_tiled_fn() {
  static EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                             cudaEnableDefault, &q);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &q);
#endif
    if (err != cudaSuccess || q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      ptr = nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// A [rows, cols] row-major matrix of 16-bit floats read in boxes of box_rows x 64 with the 128-byte swizzle;
// out-of-range elements read as zero.
bool make_map(CUtensorMap* map, CUtensorMapDataType type, const void* base, int64_t rows, int64_t cols,
              int box_rows) {
  const EncodeTiledFn fn = encode_tiled_fn();
  if (fn == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};  // bytes, dimension 1
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  return fn(map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, int BN, int STAGES, bool SWIGLU>
cudaError_t launch_one(const CUtensorMap& ma, const CUtensorMap& mb, const GemmArgs& g, int64_t rows,
                       int sm_count, cudaStream_t stream) {
  auto kernel = moe_experts_sm90_kernel<T, BN, STAGES, SWIGLU>;
  constexpr int smem = sm90_smem_bytes<BN, STAGES>();
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int64_t ntiles = (g.n + BN - 1) / BN;
  const int64_t max_tiles = (rows / kBM + g.experts) * ntiles;  // >= sum_e ceil(rows_e / BM) * ntiles
  const int64_t grid = std::min<int64_t>(max_tiles, sm_count);
  mixtral::launch(kernel, static_cast<unsigned>(grid), kThreads, smem, stream, ma, mb, g);
  return cudaGetLastError();
}

template <int BN, int STAGES>
bool fits(const MoeExpertsParams& p) {
  return p.max_smem_optin >= sm90_smem_bytes<BN, STAGES>() + kStaticSmemBound;
}

// One GEMM's configuration: tile width and ring depth, from the SM count and the shared-memory limit.
struct Config {
  int bn = 0;      // 0: no configuration fits
  int stages = 0;
};

Config choose(const MoeExpertsParams& p, int64_t rows, int64_t n) {
  // Expected M-tiles: the full ones plus about half a partial tile per expert. Fewer than two waves of 256-wide
  // tiles (GEMM2 at a few hundred tokens) leave SMs idle in the last wave: halve the width, double the tiles.
  const int64_t mtiles = rows / kBM + (p.experts + 1) / 2;
  const bool narrow = mtiles * ((n + 255) / 256) < 2LL * p.sm_count;
  Config c;
  if (!narrow && fits<256, 4>(p)) c = {256, 4};
  else if (!narrow && fits<256, 3>(p)) c = {256, 3};
  else if (fits<128, 6>(p)) c = {128, 6};
  else if (fits<128, 4>(p)) c = {128, 4};
  return c;
}

// setmaxnreg only moves registers within the CTA's pool (384 x R, R = the kernel's register count): the producer
// warpgroup returns 128 x (R - kProducerRegs), the consumers then take 256 x (kConsumerRegs - R), and their
// setmaxnreg.inc waits until the pool holds that many, forever if it never will. ptxas gives this kernel the
// __launch_bounds__ maximum, R = 168, which balances exactly; a compiler that chose fewer registers would hang the
// kernel, so such a build cannot take this path (sm90_supported is false: the automatic choice takes sm80).
template <typename T, int BN, int STAGES, bool SWIGLU>
bool regs_ok() {
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, moe_experts_sm90_kernel<T, BN, STAGES, SWIGLU>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return 128 * (attr.numRegs - kProducerRegs) >= 256 * (kConsumerRegs - attr.numRegs);
}

template <typename T, bool SWIGLU>
bool config_regs_ok(const Config& c) {
  if (c.bn == 256 && c.stages == 4) return regs_ok<T, 256, 4, SWIGLU>();
  if (c.bn == 256 && c.stages == 3) return regs_ok<T, 256, 3, SWIGLU>();
  if (c.bn == 128 && c.stages == 6) return regs_ok<T, 128, 6, SWIGLU>();
  if (c.bn == 128 && c.stages == 4) return regs_ok<T, 128, 4, SWIGLU>();
  return false;
}

template <typename T, bool SWIGLU>
cudaError_t launch_config(const Config& c, const CUtensorMap& ma, const CUtensorMap& mb, const GemmArgs& g,
                          int64_t rows, int sm_count, cudaStream_t stream) {
  if (c.bn == 256 && c.stages == 4) return launch_one<T, 256, 4, SWIGLU>(ma, mb, g, rows, sm_count, stream);
  if (c.bn == 256 && c.stages == 3) return launch_one<T, 256, 3, SWIGLU>(ma, mb, g, rows, sm_count, stream);
  if (c.bn == 128 && c.stages == 6) return launch_one<T, 128, 6, SWIGLU>(ma, mb, g, rows, sm_count, stream);
  if (c.bn == 128 && c.stages == 4) return launch_one<T, 128, 4, SWIGLU>(ma, mb, g, rows, sm_count, stream);
  return cudaErrorInvalidConfiguration;  // not reached: choose() returns one of the four
}

bool sm90_image_loaded() {
  // The kernel has a body only in an sm_90a cubin; on other devices, or with a build for plain sm_90, the loaded
  // image is missing or an empty stub. The real body's static shared memory holds the schedule (2 x 257 ints =
  // 2056 bytes); a stub has none, or only the 1 KB that sm_90 reserves per block.
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, moe_experts_sm90_kernel<__nv_bfloat16, 256, 4, true>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  constexpr size_t kScheduleBytes = 2 * (kMaxExperts + 1) * sizeof(int);
  return attr.binaryVersion >= 90 && attr.sharedSizeBytes >= kScheduleBytes && encode_tiled_fn() != nullptr;
}

// Both GEMMs' configurations fit the shared memory, and their kernels' register counts balance under setmaxnreg.
template <typename T>
bool configs_ok(const MoeExpertsParams& p) {
  const int64_t R = p.tokens * p.top_k;
  const Config c1 = choose(p, R, 2 * p.inter_size);
  const Config c2 = choose(p, R, p.hidden);
  return c1.bn != 0 && c2.bn != 0 && config_regs_ok<T, true>(c1) && config_regs_ok<T, false>(c2);
}

template <typename T>
cudaError_t run_typed(const MoeExpertsParams& p, cudaStream_t stream) {
  const CUtensorMapDataType type =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const int64_t R = p.tokens * p.top_k;
  const int64_t H = p.hidden;
  const int64_t I = p.inter_size;
  const Config c1 = choose(p, R, 2 * I);  // sm90_supported checked that both fit and balance their registers
  const Config c2 = choose(p, R, H);
  void* x_perm = p.out_rows;  // [R, H] T scratch inside out_rows, see the header comment
  CUtensorMap a1, b1, a2, b2;
  // The launcher validated the maps' inputs (16-byte aligned bases, 16-byte row strides, rows below 2^31).
  if (!make_map(&a1, type, x_perm, R, H, kBM) || !make_map(&b1, type, p.w13, p.experts * 2 * I, H, c1.bn) ||
      !make_map(&a2, type, p.inter, R, I, kBM) || !make_map(&b2, type, p.w2, p.experts * H, I, c2.bn))
    return cudaErrorInvalidValue;

  const int vec = static_cast<int>(H / 8);
  const int64_t total = R * vec;
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, static_cast<int64_t>(p.sm_count) * 16);
  mixtral::launch(moe_experts_gather_rows_kernel, static_cast<unsigned>(blocks), 256, 0, stream,
                  static_cast<const uint4*>(p.x), p.sorted_tokens, static_cast<uint4*>(x_perm), R, vec);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = launch_config<T, true>(c1, a1, b1, gemm1_args(p, x_perm, nullptr), R, p.sm_count, stream);
  if (err != cudaSuccess) return err;
  return launch_config<T, false>(c2, a2, b2, gemm2_args(p), R, p.sm_count, stream);
}

}  // namespace

bool sm90_supported(const MoeExpertsParams& p) {
  if (p.sm_major != 9 || !sm90_image_loaded()) return false;
  return p.dtype == DType::kFloat16 ? configs_ok<__half>(p) : configs_ok<__nv_bfloat16>(p);
}

cudaError_t sm90_run(const MoeExpertsParams& p, cudaStream_t stream) {
  return p.dtype == DType::kFloat16 ? run_typed<__half>(p, stream) : run_typed<__nv_bfloat16>(p, stream);
}

}  // namespace moe_experts
}  // namespace mixtral
