// moe_experts internals shared by its path files: the entry points the launcher (moe_experts.cu) calls, and for the
// two grouped-GEMM paths (moe_experts_sm80.cu, moe_experts_sm90.cu) the per-GEMM argument struct, the device-side
// tile scheduler and the two epilogues.
//
// Tile scheduler. A tile is (expert e, N-tile nt, M-tile mt) of BM expert-sorted rows by BN output columns; tiles
// never straddle experts (an expert's last M-tile is predicated). The expert offsets live on the device only, so
// every block derives the tile list itself: tiles_before[e] = sum over e' < e of ceil(rows_e' / BM) * ntiles, in
// shared memory. Tile ids are expert-major, then N-tile, then M-tile, so blocks running at the same time share
// one expert's weight N-tiles (each read from DRAM once, the others hit L2) and its few thousand A rows. The grid is
// persistent (sm_count x blocks-per-SM, capped by an upper bound of the tile count) and block b takes tiles b,
// b + grid, ...: every tile costs the same K loop, so this static round-robin keeps all SMs busy whatever the
// routing skew, without a device-side counter that would need zeroing before each launch.
#pragma once
#include "device.cuh"
#include "moe_experts.h"

namespace mixtral {
namespace moe_experts {

// The shared-memory schedule holds 2 * (E + 1) ints; Mixtral has E = 8.
constexpr int kMaxExperts = 256;
// Bound on a kernel's static shared memory (schedule + mbarriers), added to the dynamic ring when checking a
// configuration against the device's opt-in limit.
constexpr int kStaticSmemBound = 4096;

// One GEMM of the pair, as the kernels see it: C[r, n] = sum_k A[row(r), k] * B[e][n, k], r in expert e's rows.
// A, B and inter hold 16-bit floats of the kernel's element type T (bf16 or fp16).
struct GemmArgs {
  const void* a;             // GEMM1: x [T, K=H] (rows gathered); GEMM2: inter [R, K=I]
  const int* gather;         // GEMM1 on sm80: sorted_tokens [R] (A row of sorted row r); nullptr: A row = r
  const void* b;             // [E, N, K]: GEMM1 w13 (N = 2I), GEMM2 w2 (N = H)
  void* out;                 // GEMM1: inter [R, N/2] T; GEMM2: out_rows [R, N] fp32
  const int* offsets;        // [E + 1] expert_offsets (device)
  int experts;               // E
  int k;                     // K (multiple of 8)
  int n;                     // N (multiple of 8; GEMM1: multiple of 16)
};

// Fills s_off[0..E] with the expert offsets and s_tiles[0..E] with the tiles before each expert; all threads call
// it (it ends with a barrier).
__device__ __forceinline__ void build_schedule(const GemmArgs& g, int bm, int ntiles, int* s_off, int* s_tiles) {
  for (int e = threadIdx.x; e <= g.experts; e += blockDim.x) s_off[e] = g.offsets[e];
  __syncthreads();
  for (int e = threadIdx.x; e < g.experts; e += blockDim.x) {
    const int rows = s_off[e + 1] - s_off[e];
    s_tiles[e + 1] = (rows + bm - 1) / bm * ntiles;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    s_tiles[0] = 0;
    for (int e = 0; e < g.experts; ++e) s_tiles[e + 1] += s_tiles[e];
  }
  __syncthreads();
}

struct Tile {
  int e;      // expert
  int m0;     // first sorted row of the tile
  int m_end;  // one past the expert's last row (rows >= m_end are computed on zeros or garbage, never stored)
  int n0;     // first output column of the tile (GEMM1: column of w13's interleaved gate/up rows)
};

// Tile `tile` (< s_tiles[E]); `e` carries the expert over calls (tile ids only grow within a block, so the
// expert search resumes where it stopped and experts without rows, which own no tiles, are stepped over).
__device__ __forceinline__ Tile decode_tile(int tile, int& e, int bm, int bn, const int* s_off, const int* s_tiles) {
  while (tile >= s_tiles[e + 1]) ++e;
  const int local = tile - s_tiles[e];
  const int mtiles = (s_off[e + 1] - s_off[e] + bm - 1) / bm;
  Tile t;
  t.e = e;
  t.m0 = s_off[e] + (local % mtiles) * bm;
  t.m_end = s_off[e + 1];
  t.n0 = (local / mtiles) * bn;
  return t;
}

// Two adjacent elements of type T, rounded to nearest even from fp32, as one 4-byte store.
template <typename T> struct Pair;
template <> struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <> struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2half2_rn(a, b); }
};

__device__ __forceinline__ float silu_mul(float gate, float up) {
  // silu(g) = g / (1 + exp(-g)); for g -> -inf, exp overflows to inf and the quotient is -0, never NaN.
  return gate / (1.f + __expf(-gate)) * up;
}

// GEMM1 epilogue for two adjacent 8-column accumulator blocks of one row (columns nb .. nb+15 of w13's interleaved
// rows, nb a multiple of 16). In both mma.sync's C fragment and wgmma's D fragment, the thread with
// threadID_in_group t holds columns 2t and 2t+1 of each 8-column block: an even (gate) and the odd (up) column of
// the same unit, so silu(gate)*up is register-local and gives inter column nb/2 + t (block 0) and nb/2 + 4 + t
// (block 1). Lanes t and t^1 then swap one value so each stores two adjacent elements (4 bytes): even t writes
// columns (nb/2 + t, +1) of block 0, odd t writes (nb/2 + 4 + t - 1, +1) of block 1. All 32 lanes must call
// (shuffle); `valid` only predicates the store. out_row points at inter[r, 0].
template <typename T>
__device__ __forceinline__ void store_swiglu_pair(T* out_row, int nb, float g0, float u0, float g1, float u1,
                                                  bool valid) {
  const int t = threadIdx.x & 3;
  const float v0 = silu_mul(g0, u0);
  const float v1 = silu_mul(g1, u1);
  const float send = (t & 1) ? v0 : v1;
  const float recv = __shfl_xor_sync(0xffffffffu, send, 1);
  if (!valid) return;
  typename Pair<T>::type pair;
  int col;
  if (t & 1) {
    pair = Pair<T>::make(recv, v1);
    col = nb / 2 + 4 + t - 1;
  } else {
    pair = Pair<T>::make(v0, recv);
    col = nb / 2 + t;
  }
  *reinterpret_cast<typename Pair<T>::type*>(out_row + col) = pair;
}

// GEMM2 epilogue: columns n, n+1 (n even) of one fp32 output row; N is a multiple of 8, so 8-byte aligned.
__device__ __forceinline__ void store_f32_pair(float* out_row, int n, float c0, float c1, bool valid) {
  if (valid) *reinterpret_cast<float2*>(out_row + n) = make_float2(c0, c1);
}

// The two GEMMs' arguments (both grouped-GEMM paths): GEMM1 reads A = x (rows gathered through `gather` on sm80;
// nullptr on sm90, whose A is x already copied into expert order) against w13 into inter; GEMM2 reads A = inter
// against w2 into out_rows.
inline GemmArgs gemm1_args(const MoeExpertsParams& p, const void* a, const int* gather) {
  return GemmArgs{a, gather, p.w13, p.inter, p.expert_offsets, p.experts, static_cast<int>(p.hidden),
                  static_cast<int>(2 * p.inter_size)};
}

inline GemmArgs gemm2_args(const MoeExpertsParams& p) {
  return GemmArgs{p.inter, nullptr, p.w2, p.out_rows, p.expert_offsets, p.experts, static_cast<int>(p.inter_size),
                  static_cast<int>(p.hidden)};
}

// The paths' entry points. moe_experts.cu has validated p for the chosen path; the grouped-GEMM paths see dense
// weights in p.w13 / p.w2 (the launcher points them at the dequantized copies for a quantized format).
bool sm80_supported(const MoeExpertsParams& p);  // a kernel image loads on the device and a configuration fits
bool sm90_supported(const MoeExpertsParams& p);  // ... and the register budget lets setmaxnreg rebalance
cudaError_t sm80_run(const MoeExpertsParams& p, cudaStream_t stream);  // both GEMMs
cudaError_t sm90_run(const MoeExpertsParams& p, cudaStream_t stream);  // gather x, both GEMMs
cudaError_t decode_run(const MoeExpertsParams& p, cudaStream_t stream);  // both GEMVs
cudaError_t combine_run(const MoeExpertsParams& p, cudaStream_t stream);
// out [rows, K] dtype = q [rows, K] int8 or [rows, K/2] packed int4, times scale [rows] or [rows, K/128].
cudaError_t dequantize_run(const void* q, const float* scale, void* out, int64_t rows, int64_t k,
                           WeightFormat wformat, DType dtype, cudaStream_t stream);

}  // namespace moe_experts
}  // namespace mixtral
