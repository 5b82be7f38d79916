// moe_experts, grouped expert GEMM, sm_80 path: mma.sync m16n8k16 bf16/fp16 -> fp32, ldmatrix, cp.async
// multistage pipeline. Runs on A100-class GPUs and (from the sm_90a cubin) on Hopper when the sm90 path is
// unavailable or not chosen.
//
// Algorithm: persistent blocks walk the tile list of moe_experts_common.cuh. Per tile (BM x 128 outputs), K is
// walked in 64-wide k-tiles through a STAGES-deep ring of shared-memory buffers filled by cp.async (16-byte chunks): A rows
// are gathered on the fly (GEMM1: A row of sorted row r is x[sorted_tokens[r]]; no permuted copy of x is needed
// because cp.async takes one address per 16-byte chunk anyway), B rows are the expert's weight rows. 8 warps in a
// 2 (M) x 4 (N) grid, each warp owns (BM/2) x 32 outputs = (BM/32) x 4 mma tiles of 16x8, fp32 accumulators.
//
// Shared-memory layout: a tile is rows of 64 16-bit elements = 128 bytes = 8 chunks of 16 bytes; chunk c of row r is
// stored at chunk position c ^ (r & 7) (XOR swizzle). ldmatrix reads 8 rows (r..r+7, r a multiple of 8) at one logical
// chunk: the physical chunks c ^ 0..7 are all different, so the 8 row reads hit all 32 banks once, conflict-free.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, .bf16 and .f16 alike; g = lane / 4 "groupID", t = lane % 4
// "threadID_in_group"):
//   A (16x16, row-major): a[0] = (row g,   k 2t..2t+1), a[1] = (row g+8, k 2t..2t+1),
//                         a[2] = (row g,   k 2t+8..+9), a[3] = (row g+8, k 2t+8..+9)   (2 elements per register)
//   B (16x8, "col"):      b[0] = (k 2t..2t+1, col g),   b[1] = (k 2t+8..+9, col g)
//   C/D (16x8 fp32):      c[0], c[1] = (row g, cols 2t, 2t+1),  c[2], c[3] = (row g+8, cols 2t, 2t+1)
// ldmatrix.x4 (no .trans): lanes 8i..8i+7 give the row addresses of 8x8 matrix i (16 bytes per row); register i
// of every lane receives matrix i's (row lane/4, elements 2*(lane%4), +1). Hence:
//   A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) -> a[0..3]; lane l
//      addresses row (l & 15), k chunk (l >> 4).
//   B (stored [n][k], k contiguous, so a row of the 8x8 matrix is one n with 8 consecutive k = what b[] needs):
//      matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) -> b[0], b[1] of n-block 0,
//      b[0], b[1] of n-block 1; lane l addresses n ((l >> 4) * 8 + (l & 7)), k chunk ((l >> 3) & 1).
//
// Limits: K and N multiples of 8 (16-byte chunks are whole; GEMM1's N = 2I a multiple of 16), rows arbitrary. Rows
// past the expert's end and k past K are zero-filled by cp.async (src-size 0), columns past N are loaded as zeros
// and not stored. Numerics: fp32 accumulation in k order per 16-wide step; GEMM1 rounds silu(gate)*up to the element
// type (bf16 or fp16, a template parameter: the kernels are byte-movers except for the mma and the final rounding).
#include <algorithm>
#include <type_traits>

#include "moe_experts_common.cuh"
#include "arch/sm80.cuh"

namespace mixtral {
namespace moe_experts {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kBN = 128;
constexpr int kBK = 64;        // 64 16-bit elements = 128-byte rows
constexpr int kRowBytes = kBK * 2;

template <int BM, int STAGES>
constexpr int sm80_smem_bytes() {
  return STAGES * (BM + kBN) * kRowBytes;
}

template <int BM, int STAGES>
bool fits(const MoeExpertsParams& p) {
  return p.max_smem_optin >= sm80_smem_bytes<BM, STAGES>() + kStaticSmemBound;
}

// Byte offset of logical 16-byte chunk c of row r in a swizzled 128-byte-row tile.
__device__ __forceinline__ uint32_t swz(int r, int c) { return r * kRowBytes + ((c ^ (r & 7)) << 4); }

// SWIGLU: GEMM1 (gathered A rows, silu(gate)*up epilogue, T out [R, N/2]); else GEMM2 (fp32 out [R, N]).
template <typename T, int BM, int STAGES, bool SWIGLU>
__global__ void __launch_bounds__(kThreads) moe_experts_sm80_kernel(GemmArgs g) {
  constexpr int kWarpM = BM / 2;          // rows per warp
  constexpr int kMFrag = kWarpM / 16;     // 16-row mma tiles per warp
  constexpr int kNFrag = 4;               // 8-column mma tiles per warp (32 columns)
  constexpr int kARowsPerThread = BM / 32;  // 8 chunks per row, 256 threads: 32 rows per pass
  constexpr int kBRowsPerThread = kBN / 32;
  constexpr int kStageA = BM * kRowBytes;
  constexpr int kStageB = kBN * kRowBytes;
  static_assert(BM == 64 || BM == 128, "BM must be 64 or 128");
  static_assert(STAGES >= 3, "at least 3 stages");

  MX_DYNAMIC_SHARED(unsigned char, smem, 128);
  MX_SHARED(int[kMaxExperts + 1], s_off);
  MX_SHARED(int[kMaxExperts + 1], s_tiles);

  const int ntiles = (g.n + kBN - 1) / kBN;
  build_schedule(g, BM, ntiles, s_off, s_tiles);
  const int total = s_tiles[g.experts];

  const T* A = static_cast<const T*>(g.a);
  const T* B = static_cast<const T*>(g.b);
  const uint32_t sA = smem_u32(smem);
  const uint32_t sB = sA + STAGES * kStageA;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp >> 2;  // 0..1
  const int wn = warp & 3;   // 0..3
  const int ktiles = (g.k + kBK - 1) / kBK;
  // This thread's copy assignment: chunk ld_c of rows ld_r + 32 i.
  const int ld_c = tid & 7;
  const int ld_r = tid >> 3;

  int e = 0;
  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const Tile tl = decode_tile(tile, e, BM, kBN, s_off, s_tiles);
    const T* b_exp = B + static_cast<int64_t>(tl.e) * g.n * g.k;

    // Source rows of this thread's chunks (resolved once per tile; invalid rows read nothing and fill zeros).
    const T* a_src[kARowsPerThread];
    bool a_ok[kARowsPerThread];
#pragma unroll
    for (int i = 0; i < kARowsPerThread; ++i) {
      const int r = tl.m0 + ld_r + 32 * i;
      a_ok[i] = r < tl.m_end;
      const int src_row = a_ok[i] ? (g.gather ? __ldg(g.gather + r) : r) : 0;
      a_src[i] = A + static_cast<int64_t>(src_row) * g.k;
    }
    const T* b_src[kBRowsPerThread];
    bool b_ok[kBRowsPerThread];
#pragma unroll
    for (int i = 0; i < kBRowsPerThread; ++i) {
      const int n = tl.n0 + ld_r + 32 * i;
      b_ok[i] = n < g.n;
      b_src[i] = b_exp + static_cast<int64_t>(b_ok[i] ? n : 0) * g.k;
    }

    // A chunk that is not loaded (row past the expert, column past N, k past K) is zero-filled from src-size 0;
    // its source address is then the tensor's base, so no out-of-range address is ever formed.
    auto load_stage = [&](int kt, int stage) {
      const int kcol = kt * kBK + ld_c * 8;
      const bool k_ok = kcol < g.k;
      const uint32_t a_dst = sA + stage * kStageA;
      const uint32_t b_dst = sB + stage * kStageB;
#pragma unroll
      for (int i = 0; i < kARowsPerThread; ++i) {
        const bool ok = a_ok[i] && k_ok;
        cp_async_cg_16(a_dst + swz(ld_r + 32 * i, ld_c), ok ? a_src[i] + kcol : A, ok ? 16 : 0);
      }
#pragma unroll
      for (int i = 0; i < kBRowsPerThread; ++i) {
        const bool ok = b_ok[i] && k_ok;
        cp_async_cg_16(b_dst + swz(ld_r + 32 * i, ld_c), ok ? b_src[i] + kcol : B, ok ? 16 : 0);
      }
    };

    float acc[kMFrag][kNFrag][4];
#pragma unroll
    for (int i = 0; i < kMFrag; ++i)
#pragma unroll
      for (int j = 0; j < kNFrag; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

    // Prologue: k-tiles 0 .. STAGES-2 in flight, one commit group each (empty groups past the end keep the
    // group arithmetic of the main loop uniform).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < ktiles) load_stage(s, s);
      cp_async_commit_group();
    }

    for (int kt = 0; kt < ktiles; ++kt) {
      // Groups committed so far: STAGES-1+kt; leaving STAGES-2 pending means k-tile kt has landed (for this
      // thread); the barrier makes every thread's chunks visible and proves all warps are done with k-tile kt-1,
      // whose buffer ((kt-1) % STAGES == (kt+STAGES-1) % STAGES) the prefetch below overwrites.
      cp_async_wait_group<STAGES - 2>();
      __syncthreads();
      const int pf = kt + STAGES - 1;
      if (pf < ktiles) load_stage(pf, pf % STAGES);
      cp_async_commit_group();

      const int stage = kt % STAGES;
      const uint32_t a_base = sA + stage * kStageA;
      const uint32_t b_base = sB + stage * kStageB;
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks) {
        uint32_t af[kMFrag][4];
        uint32_t bf[kNFrag][2];
#pragma unroll
        for (int i = 0; i < kMFrag; ++i) {
          const int row = wm * kWarpM + i * 16 + (lane & 15);
          const int chunk = ks * 2 + (lane >> 4);
          ldmatrix_x4(a_base + swz(row, chunk), af[i][0], af[i][1], af[i][2], af[i][3]);
        }
#pragma unroll
        for (int j = 0; j < kNFrag / 2; ++j) {
          const int nrow = wn * 32 + j * 16 + ((lane >> 4) << 3) + (lane & 7);
          const int chunk = ks * 2 + ((lane >> 3) & 1);
          ldmatrix_x4(b_base + swz(nrow, chunk), bf[2 * j][0], bf[2 * j][1], bf[2 * j + 1][0], bf[2 * j + 1][1]);
        }
#pragma unroll
        for (int i = 0; i < kMFrag; ++i)
#pragma unroll
          for (int j = 0; j < kNFrag; ++j) mma_m16n8k16_f32<T>(acc[i][j], af[i], bf[j][0], bf[j][1]);
      }
    }
    // Drain the (empty) trailing groups and make sure no warp still reads the ring before the next tile's
    // prologue refills it.
    cp_async_wait_group<0>();
    __syncthreads();

    // Epilogue straight from registers (see moe_experts_common.cuh for the fragment -> column mapping).
    const int grp = lane >> 2;
    const int tig = lane & 3;
#pragma unroll
    for (int i = 0; i < kMFrag; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = tl.m0 + wm * kWarpM + i * 16 + grp + 8 * h;
        const bool row_ok = r < tl.m_end;
        if constexpr (SWIGLU) {
          T* out_row = static_cast<T*>(g.out) + static_cast<int64_t>(r) * (g.n / 2);
#pragma unroll
          for (int j = 0; j < kNFrag; j += 2) {
            const int nb = tl.n0 + wn * 32 + j * 8;  // multiple of 16; N too, so both blocks are in or out
            store_swiglu_pair(out_row, nb, acc[i][j][2 * h], acc[i][j][2 * h + 1], acc[i][j + 1][2 * h],
                              acc[i][j + 1][2 * h + 1], row_ok && nb < g.n);
          }
        } else {
          float* out_row = static_cast<float*>(g.out) + static_cast<int64_t>(r) * g.n;
#pragma unroll
          for (int j = 0; j < kNFrag; ++j) {
            const int n = tl.n0 + wn * 32 + j * 8 + 2 * tig;
            store_f32_pair(out_row, n, acc[i][j][2 * h], acc[i][j][2 * h + 1], row_ok && n < g.n);
          }
        }
      }
    }
  }
}

template <typename T, int BM, int STAGES, bool SWIGLU>
cudaError_t launch_one(const GemmArgs& g, int64_t rows, int sm_count, cudaStream_t stream) {
  auto kernel = moe_experts_sm80_kernel<T, BM, STAGES, SWIGLU>;
  constexpr int smem = sm80_smem_bytes<BM, STAGES>();
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  // Upper bound of the tile count: sum_e ceil(rows_e / BM) <= rows / BM + E.
  const int64_t ntiles = (g.n + kBN - 1) / kBN;
  const int64_t max_tiles = (rows / BM + g.experts) * ntiles;
  const int64_t grid = std::min<int64_t>(max_tiles, static_cast<int64_t>(sm_count) * per_sm);
  mixtral::launch(kernel, static_cast<unsigned>(grid), kThreads, smem, stream, g);
  return cudaGetLastError();
}

template <typename T, bool SWIGLU>
cudaError_t launch_gemm(const GemmArgs& g, int64_t rows, const MoeExpertsParams& p, cudaStream_t stream) {
  // BM = 64 when experts are small (a 128-row tile would be mostly padding) or when 128-row tiles would leave
  // SMs idle; 128 otherwise (twice the reuse of each B fragment). Stages: 4 when the device's shared memory
  // allows it, else 3.
  const int64_t ntiles = (g.n + kBN - 1) / kBN;
  const bool small = rows / g.experts < 96 || (rows / 128) * ntiles < 2LL * p.sm_count;
  if (small) {
    if (fits<64, 4>(p)) return launch_one<T, 64, 4, SWIGLU>(g, rows, p.sm_count, stream);
    if (fits<64, 3>(p)) return launch_one<T, 64, 3, SWIGLU>(g, rows, p.sm_count, stream);
    return cudaErrorInvalidConfiguration;  // not reached: sm80_supported checked fits<64, 3>
  }
  if (fits<128, 4>(p)) return launch_one<T, 128, 4, SWIGLU>(g, rows, p.sm_count, stream);
  if (fits<128, 3>(p)) return launch_one<T, 128, 3, SWIGLU>(g, rows, p.sm_count, stream);
  if (fits<64, 3>(p)) return launch_one<T, 64, 3, SWIGLU>(g, rows, p.sm_count, stream);
  return cudaErrorInvalidConfiguration;
}

}  // namespace

bool sm80_supported(const MoeExpertsParams& p) {
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, moe_experts_sm80_kernel<__nv_bfloat16, 128, 4, true>) != cudaSuccess) {
    (void)cudaGetLastError();  // "no kernel image for this device" is an answer here, not a sticky error
    return false;
  }
  return fits<64, 3>(p);  // the smallest configuration
}

namespace {

template <typename T>
cudaError_t run_typed(const MoeExpertsParams& p, cudaStream_t stream) {
  const int64_t rows = p.tokens * p.top_k;
  cudaError_t err = launch_gemm<T, true>(gemm1_args(p, p.x, p.sorted_tokens), rows, p, stream);
  if (err != cudaSuccess) return err;
  return launch_gemm<T, false>(gemm2_args(p), rows, p, stream);
}

}  // namespace

cudaError_t sm80_run(const MoeExpertsParams& p, cudaStream_t stream) {
  return p.dtype == DType::kFloat16 ? run_typed<__half>(p, stream) : run_typed<__nv_bfloat16>(p, stream);
}

}  // namespace moe_experts
}  // namespace mixtral
