// moe_experts, decode path: two grouped GEMVs; and the steps every path shares: the weighted combine, and the
// dequantize that expands quantized weights for the grouped-GEMM paths (moe_experts.h says which path runs).
//
// Rows: the R = T*k (token, slot) pairs in expert-sorted order; expert e owns rows offsets[e] .. offsets[e+1]-1.
// GEMV1: inter[r, i] = round(silu(w1[e,i] . x[tok(r)]) * (w3[e,i] . x[tok(r)])), w13 rows interleaved (2i gate,
//        2i+1 up) so the warp that reads rows 2i, 2i+1 has both dot products and applies the activation in fp32.
// GEMV2: out_rows[r, h] = w2[e,h] . inter[r] in fp32 (unweighted; rows of an expert are computed together).
// Combine: y[t] = round(sum_s topk_weights[t,s] * out_rows[token_rows[t,s]]), slots summed in order, no atomics.
//
// What matters at decode sizes is reading each ACTIVE expert's weights exactly once at full bandwidth. Which
// experts are active is known only on the device, so the grid is (N-tiles, active slot a < min(E, R)): a block
// finds the a-th nonempty expert from expert_offsets (a ballot over the E counts) and exits if there are fewer; the
// host never synchronises. Block: 8 warps; a warp owns 4 consecutive weight rows (two gate/up units in GEMV1) and
// k_split warps split the K dimension of the same rows (chosen on the host from K so that the grid has many blocks
// per expert: the long K of GEMV2 is split 4 ways for Mixtral). Lanes stride over K in 16-byte vectors (8 elements),
// weights loaded with ld.global.nc.L1::no_allocate (streamed once: keep L1 for the activations), UNR x rows
// vectors per thread in flight (all issued before any is used: the K loop body has no branch), fp32 FMA. All rows
// (tokens) of the expert in the current chunk are computed from the same weight registers; the activation vectors
// come through L1 (__ldg), shared by every warp of the block.
// A chunk holds up to RMAX rows; RMAX is chosen on the host from T (an expert has at most T rows) and the block
// dispatches on the actual count (1, 2, 4, 8 or 16 accumulator columns, compile-time), so T = 1 never pays for
// unused rows. Experts with more rows than RMAX loop over chunks, re-streaming their weights: correct for any T,
// but the large-T path belongs to the tensor-core grouped GEMM. Reduction: butterfly shuffles inside the warp,
// then the k_split partials summed in warp order through shared memory (fixed order: deterministic bits).
// Quantized weights (WeightFormat kInt8 / kInt4, moe_experts.h): the same loop over 16-byte weight vectors, which
// now hold 16 or 32 weights (so half or a quarter of the bytes per row); each is unpacked in registers 8 weights at a
// time, multiplied by its row's (int8) or its row-and-128-group's (int4) float32 scale - the reference's w = q * s,
// rounded identically - and fed to the same fp32 FMAs against the matching 8-element activation vector. The scales
// come through L1 (__ldg): the 16 or 4 lanes that read one row's group share a line.
// Limits: H and I multiples of 8 (dense), 16 (int8) or 128 (int4), 16-byte aligned tensors, E <= 64. bf16 and fp16
// activations (fp32 accumulation throughout).
#include <cstring>

#include "device.cuh"
#include "arch/common.cuh"
#include "moe_experts_common.cuh"

namespace mixtral {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;  // weight rows per warp: even, so GEMV1's gate/up pairs never straddle warps
constexpr int kVec = 8;          // elements per 16-byte vector
constexpr int kMaxChunkRows = 16;
constexpr int kCombineThreads = 256;
static_assert(kRowsPerWarp % 2 == 0, "gate/up pairs must stay within a warp");

enum class Epilogue { kSiluMul, kStoreF32 };

struct GemvProblem {
  const void* w;               // [E, N, K] (dense / int8) or [E, N, K/2] bytes (int4)
  const float* scale;          // quantized: [E, N] (int8) or [E, N, K/128] (int4); dense: unused
  const void* a;               // activations [*, K]: x (gathered through `gather`) or inter (row r)
  const int* gather;           // sorted_tokens (GEMV1) or nullptr (GEMV2: row r reads a[r])
  const int* expert_offsets;   // [E + 1]
  void* out;                   // GEMV1: inter [R, N/2] activation dtype; GEMV2: out_rows [R, N] fp32
  int64_t n;                   // output rows of the weight matrix (2I or H), a multiple of kRowsPerWarp
  int64_t k;                   // reduction length (H or I), a multiple of the format's weights per vector
  int experts;
  int k_split;                 // warps sharing one row group along K: 1, 2, 4 or 8
};

struct CombineArgs {
  const float* out_rows;       // [R, H] fp32, expert-sorted rows
  const float* topk_weights;   // [T, k]
  const int* token_rows;       // [T, k] row of each (token, slot)
  void* y;                     // [T, H] activation dtype
  int64_t tokens;              // T
  int64_t hidden;              // H, a multiple of 8
  int top_k;                   // k
  DType dtype;                 // of y: bf16 or fp16
};

// out[r, j] = round(q[r, j] * scale) with the row's (int8) or the row-and-group's (int4) scale: the reference's
// dequantize, rounded once to dtype.
struct DequantArgs {
  const void* q;               // [rows, K] int8 or [rows, K/2] packed int4 (rows = E * N of a [E, N, K] matrix)
  const float* scale;          // [rows] (int8) or [rows, K/128] (int4)
  void* out;                   // [rows, K] in dtype
  int64_t rows;
  int64_t k;                   // K: a multiple of 16 (int8) or 128 (int4)
  WeightFormat wformat;        // kInt8 or kInt4
  DType dtype;                 // of out: bf16 or fp16
};

// Streamed weight load: read-only for the kernel, not kept in L1, with a 256-byte L2 prefetch hint. volatile so
// the compiler issues every load where it is written (all UNR x RW of an iteration up front) instead of sinking
// them into the tail-guarded compute below, which would leave one vector per row in flight.
__device__ __forceinline__ uint4 ld_stream(const uint4* ptr) { return ld_global_nc_L1_no_allocate_v4_u32(ptr); }

template <typename T> __device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]);
template <> __device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4& v, float (&f)[8]) {
  // bf16 -> fp32 is exact: the 16 bits become the high half of the float.
  const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(u[i] << 16);
    f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}
template <> __device__ __forceinline__ void unpack8<__half>(const uint4& v, float (&f)[8]) {
  const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &u[i], sizeof(h));
    const float2 g = __half22float2(h);
    f[2 * i] = g.x;
    f[2 * i + 1] = g.y;
  }
}

// Weights per 16-byte weight vector: 8 (dense bf16/fp16), 16 (int8) or 32 (int4).
template <WeightFormat F> constexpr int weights_per_vector() {
  return F == WeightFormat::kDense ? 8 : (F == WeightFormat::kInt8 ? 16 : 32);
}

// Weights 8j .. 8j + 7 of a weight vector as floats (before the scale). int8: bytes 8j .. 8j + 7 (words 2j, 2j + 1);
// int4: word j, input 8j + b in bits 4b .. 4b + 3. The shift left then arithmetic shift right sign-extends.
template <typename T, WeightFormat F>
__device__ __forceinline__ void unpack_weights(const uint4& v, int J, float (&f)[8]) {
  if constexpr (F == WeightFormat::kDense) {
    unpack8<T>(v, f);  // one piece (J == 0)
  } else {
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
    if constexpr (F == WeightFormat::kInt8) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        f[b] = static_cast<float>(static_cast<int>(u[2 * J] << (24 - 8 * b)) >> 24);
        f[4 + b] = static_cast<float>(static_cast<int>(u[2 * J + 1] << (24 - 8 * b)) >> 24);
      }
    } else {
#pragma unroll
      for (int b = 0; b < 8; ++b) f[b] = static_cast<float>(static_cast<int>(u[J] << (28 - 4 * b)) >> 28);
    }
  }
}

// The slot-th nonempty expert (ascending expert index) and its row range; false when fewer are nonempty. Every
// warp computes it for itself (same answer), so no barrier is needed before a block-uniform early exit.
__device__ __forceinline__ bool find_active_expert(const int* offsets, int E, int slot, int& e, int& begin,
                                                   int& end) {
  const int lane = threadIdx.x & 31;
  // Lane l holds the row ranges of experts l and l + 32 (one round trip to memory, no dependent second load).
  const int lo0 = lane < E ? __ldg(offsets + lane) : 0, hi0 = lane < E ? __ldg(offsets + lane + 1) : 0;
  const int lo1 = lane + 32 < E ? __ldg(offsets + lane + 32) : 0;
  const int hi1 = lane + 32 < E ? __ldg(offsets + lane + 33) : 0;
  unsigned long long m = __ballot_sync(0xffffffffu, hi0 > lo0) |
                         (static_cast<unsigned long long>(__ballot_sync(0xffffffffu, hi1 > lo1)) << 32);
  for (int i = 0; i < slot && m != 0ull; ++i) m &= m - 1ull;  // drop the lowest set bit `slot` times
  if (m == 0ull) return false;  // warp-uniform (m is the same in every lane)
  e = __ffsll(static_cast<long long>(m)) - 1;
  const bool high = e >= 32;
  begin = __shfl_sync(0xffffffffu, high ? lo1 : lo0, e & 31);
  end = __shfl_sync(0xffffffffu, high ? hi1 : hi0, e & 31);
  return true;
}

// One chunk of ROWS activation rows (nr <= ROWS of them real; the rest duplicate the last and are not stored)
// against this warp's kRowsPerWarp weight rows starting at n0, in sub-passes of RW rows so that the RW x ROWS
// accumulators fit in registers. Every thread of the block calls this (barriers inside).
template <typename T, WeightFormat F, Epilogue EPI, int ROWS>
__device__ __forceinline__ void gemv_chunk(const GemvProblem& p, const uint4* __restrict__ w,
                                           const float* __restrict__ srow, int64_t n0, bool store, int cs, int nr,
                                           float (*s_part)[32]) {
  // Register budget (<= 128 for two blocks per SM): RW x ROWS accumulators, UNR x RW weight vectors in flight,
  // ROWS activation offsets. Few rows (the decode case): 4 rows x 4 vectors in flight; more rows: fewer.
  constexpr int RW = ROWS <= 4 ? 4 : 2;       // weight rows per sub-pass
  // Quantized vectors hold 2 or 4 times the weights (more registers to unpack them, and as many bytes of weights per
  // vector as ever): from 4 rows up they keep half as many in flight, which ptxas fits without spilling.
  constexpr int UNR_DENSE = ROWS <= 2 ? 4 : (ROWS <= 8 ? 2 : 1);
  constexpr int UNR = F == WeightFormat::kDense || ROWS <= 2 ? UNR_DENSE : (UNR_DENSE > 1 ? UNR_DENSE / 2 : 1);
  static_assert(kRowsPerWarp % RW == 0 && RW % 2 == 0 && RW * ROWS <= 32, "sub-pass shape");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ks = p.k_split;
  const int wk = warp % ks;
  constexpr int EPV = weights_per_vector<F>();
  constexpr int P = EPV / kVec;  // activation vectors per weight vector
  const int64_t nvec = p.k / EPV;  // weight vectors per row
  const int64_t groups = F == WeightFormat::kInt4 ? p.k / kInt4Group : 1;  // scales per row
  const int64_t step = 32 * static_cast<int64_t>(ks);

  // Activation rows as 32-bit vector offsets from one base (half the registers of pointers; the binding checks
  // that R * max(H, I) / 8 fits in 32 bits).
  const uint4* abase = static_cast<const uint4*>(p.a);
  unsigned aoff[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int rr = cs + (r < nr ? r : nr - 1);
    const unsigned src = p.gather ? static_cast<unsigned>(__ldg(p.gather + rr)) : static_cast<unsigned>(rr);
    aoff[r] = src * static_cast<unsigned>(p.k / kVec);
  }

#pragma unroll 1
  for (int sp = 0; sp < kRowsPerWarp; sp += RW) {
    float acc[RW][ROWS];
#pragma unroll
    for (int i = 0; i < RW; ++i)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[i][r] = 0.f;

    // No branch in the body: ptxas sinks loads into guarded blocks, which would leave one vector per row in
    // flight. Past the end of K a lane reloads its last valid vector and zeroes the weights, so the extra products
    // add exact zeros (for finite activations; non-finite ones make the true sum non-finite anyway).
#pragma unroll 1
    for (int64_t c0 = wk * 32 + lane; c0 < nvec; c0 += step * UNR) {
      uint4 wv[UNR][RW];
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const bool in = c0 + u * step < nvec;
        const int64_t c = in ? c0 + u * step : nvec - 1;
#pragma unroll
        for (int i = 0; i < RW; ++i) {
          wv[u][i] = ld_stream(w + (sp + i) * nvec + c);
          if (!in) wv[u][i] = make_uint4(0u, 0u, 0u, 0u);
        }
      }
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int64_t c = c0 + u * step < nvec ? c0 + u * step : nvec - 1;
        float sc[RW];  // quantized: the scale of each row for this vector's inputs
        if constexpr (F != WeightFormat::kDense) {
          const int64_t g = F == WeightFormat::kInt4 ? (c * EPV) / kInt4Group : 0;
#pragma unroll
          for (int i = 0; i < RW; ++i) sc[i] = __ldg(srow + (sp + i) * groups + g);
        }
#pragma unroll
        for (int j = 0; j < P; ++j) {  // fully unrolled: j is a constant, the word indices below are registers
          float wf[RW][8];
#pragma unroll
          for (int i = 0; i < RW; ++i) {
            unpack_weights<T, F>(wv[u][i], j, wf[i]);
            if constexpr (F != WeightFormat::kDense) {
#pragma unroll
              for (int q = 0; q < 8; ++q) wf[i][q] *= sc[i];
            }
          }
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            float af[8];
            unpack8<T>(__ldg(abase + aoff[r] + static_cast<unsigned>(c * P + j)), af);
#pragma unroll
            for (int i = 0; i < RW; ++i)
#pragma unroll
              for (int q = 0; q < 8; ++q) acc[i][r] = fmaf(wf[i][q], af[q], acc[i][r]);
          }
        }
      }
    }

    // Warp totals; lane i * ROWS + r publishes acc[i][r] for the cross-warp (K-split) sum.
    float mine = 0.f;
#pragma unroll
    for (int i = 0; i < RW; ++i)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float v = warp_sum(acc[i][r]);
        if (lane == i * ROWS + r) mine = v;
      }
    if (lane < RW * ROWS) s_part[warp][lane] = mine;
    __syncthreads();
    if (wk == 0 && store) {
      // The K-split partners of this warp are warps warp .. warp + ks - 1, summed in that order.
      if constexpr (EPI == Epilogue::kStoreF32) {
        if (lane < RW * ROWS) {
          const int i = lane / ROWS, r = lane % ROWS;
          float v = 0.f;
          for (int kk = 0; kk < ks; ++kk) v += s_part[warp + kk][lane];
          if (r < nr) static_cast<float*>(p.out)[static_cast<int64_t>(cs + r) * p.n + n0 + sp + i] = v;
        }
      } else {
        if (lane < (RW / 2) * ROWS) {
          const int u = lane / ROWS, r = lane % ROWS;
          float g = 0.f, up = 0.f;
          for (int kk = 0; kk < ks; ++kk) {
            g += s_part[warp + kk][(2 * u) * ROWS + r];
            up += s_part[warp + kk][(2 * u + 1) * ROWS + r];
          }
          // silu(g) = g * sigmoid(g); for g -> -inf, __expf(-g) -> inf and the quotient -> -0, never NaN.
          const float act = g / (1.f + __expf(-g)) * up;
          const int64_t units = p.n / 2;
          if (r < nr)
            static_cast<T*>(p.out)[static_cast<int64_t>(cs + r) * units + (n0 + sp) / 2 + u] = from_float<T>(act);
        }
      }
    }
    __syncthreads();  // s_part is rewritten by the next sub-pass / chunk
  }
}

// Two blocks (16 warps) per SM keep enough weight loads in flight; the 16-row variant (T > 8 only) needs more than
// 128 registers and settles for one block per SM rather than spilling.
template <typename T, WeightFormat F, Epilogue EPI, int RMAX>
__global__ void __launch_bounds__(kThreads, RMAX >= 16 ? 1 : 2) moe_experts_gemv_kernel(GemvProblem p) {
  MX_SHARED(float[kWarps][32], s_part);
  int e, r_begin, r_end;
  if (!find_active_expert(p.expert_offsets, p.experts, blockIdx.y, e, r_begin, r_end)) return;
  const int warp = threadIdx.x >> 5;
  const int ks = p.k_split;
  const int64_t rows_per_block = static_cast<int64_t>(kWarps / ks) * kRowsPerWarp;
  int64_t n0 = blockIdx.x * rows_per_block + (warp / ks) * kRowsPerWarp;
  const bool store = n0 < p.n;
  // A warp past the last row group redoes the last one (a valid address) without storing, so that every warp of
  // the block reaches the same barriers.
  if (!store) n0 = p.n - kRowsPerWarp;
  // Rows are whole 16-byte vectors in every format: nvec of them, each holding weights_per_vector<F>() weights.
  const int64_t nvec = p.k / weights_per_vector<F>();
  const uint4* w = static_cast<const uint4*>(p.w) + (static_cast<int64_t>(e) * p.n + n0) * nvec;
  const float* srow = nullptr;  // the scales of this warp's first row
  if constexpr (F != WeightFormat::kDense)
    srow = p.scale + (static_cast<int64_t>(e) * p.n + n0) * (F == WeightFormat::kInt4 ? p.k / kInt4Group : 1);
  for (int cs = r_begin; cs < r_end; cs += RMAX) {
    const int nr = r_end - cs < RMAX ? r_end - cs : RMAX;
    // Compile-time accumulator widths: the smallest that holds nr (block-uniform branch).
    if (nr == 1) {
      gemv_chunk<T, F, EPI, 1>(p, w, srow, n0, store, cs, nr, s_part);
    } else if (RMAX == 2 || (RMAX > 2 && nr <= 2)) {
      if constexpr (RMAX >= 2) gemv_chunk<T, F, EPI, 2>(p, w, srow, n0, store, cs, nr, s_part);
    } else if (RMAX == 4 || (RMAX > 4 && nr <= 4)) {
      if constexpr (RMAX >= 4) gemv_chunk<T, F, EPI, 4>(p, w, srow, n0, store, cs, nr, s_part);
    } else if (RMAX == 8 || (RMAX > 8 && nr <= 8)) {
      if constexpr (RMAX >= 8) gemv_chunk<T, F, EPI, 8>(p, w, srow, n0, store, cs, nr, s_part);
    } else {
      if constexpr (RMAX >= 16) gemv_chunk<T, F, EPI, 16>(p, w, srow, n0, store, cs, nr, s_part);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) moe_experts_combine_kernel(CombineArgs p) {
  const int64_t t = blockIdx.x;
  const int64_t h = (static_cast<int64_t>(blockIdx.y) * kCombineThreads + threadIdx.x) * kVec;
  if (h >= p.hidden) return;
  float acc[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) acc[j] = 0.f;
  for (int s = 0; s < p.top_k; ++s) {  // slot order: the fixed summation order of the contract
    const int row = __ldg(p.token_rows + t * p.top_k + s);
    const float wt = __ldg(p.topk_weights + t * p.top_k + s);
    const float4* src = reinterpret_cast<const float4*>(p.out_rows + static_cast<int64_t>(row) * p.hidden + h);
    const float4 a = __ldg(src), b = __ldg(src + 1);
    acc[0] += wt * a.x; acc[1] += wt * a.y; acc[2] += wt * a.z; acc[3] += wt * a.w;
    acc[4] += wt * b.x; acc[5] += wt * b.y; acc[6] += wt * b.z; acc[7] += wt * b.w;
  }
  T o[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) o[j] = from_float<T>(acc[j]);
  uint4 packed;
  memcpy(&packed, o, sizeof(packed));
  *reinterpret_cast<uint4*>(static_cast<T*>(p.y) + t * p.hidden + h) = packed;
}

// One thread per 8 consecutive outputs of a row (8 int8 bytes or 4 int4 bytes in, one 16-byte vector out); grid
// (rows, vector blocks of the row). Streaming: every byte is read and written once.
template <typename T, WeightFormat F>
__global__ void __launch_bounds__(kCombineThreads) moe_experts_dequant_kernel(DequantArgs p) {
  const int64_t row = blockIdx.x;
  const int64_t v = static_cast<int64_t>(blockIdx.y) * kCombineThreads + threadIdx.x;  // 8-output vector of the row
  if (v * kVec >= p.k) return;
  uint4 packed = make_uint4(0u, 0u, 0u, 0u);
  float s;
  if constexpr (F == WeightFormat::kInt8) {
    const uint2 b = __ldg(reinterpret_cast<const uint2*>(static_cast<const int8_t*>(p.q) + row * p.k) + v);
    packed.x = b.x;
    packed.y = b.y;
    s = __ldg(p.scale + row);
  } else {
    packed.x = __ldg(reinterpret_cast<const unsigned*>(static_cast<const uint8_t*>(p.q) + row * (p.k / 2)) + v);
    s = __ldg(p.scale + row * (p.k / kInt4Group) + (v * kVec) / kInt4Group);
  }
  float f[8];
  unpack_weights<T, F>(packed, 0, f);  // the first 8 weights of the vector: exactly the ones loaded
  T o[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) o[j] = from_float<T>(f[j] * s);
  uint4 out;
  memcpy(&out, o, sizeof(out));
  reinterpret_cast<uint4*>(static_cast<T*>(p.out) + row * p.k)[v] = out;
}

// Warps splitting K: enough that a long K (I = 14336 in GEMV2) still yields many blocks per active expert, never
// so many that a warp's slice gets shorter than 2048 elements (8 vectors per lane).
int choose_k_split(int64_t k) {
  int ks = 1;
  while (ks < kWarps && k / (2 * ks) >= 2048) ks *= 2;
  return ks;
}

template <typename T, WeightFormat F, Epilogue EPI, int RMAX>
cudaError_t launch_gemv(const GemvProblem& g, int slots, cudaStream_t stream) {
  const int64_t rows_per_block = static_cast<int64_t>(kWarps / g.k_split) * kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((g.n + rows_per_block - 1) / rows_per_block), static_cast<unsigned>(slots));
  mixtral::launch(moe_experts_gemv_kernel<T, F, EPI, RMAX>, grid, kThreads, 0, stream, g);
  return cudaGetLastError();
}

template <typename T, WeightFormat F, Epilogue EPI>
cudaError_t launch_gemv_rows(const GemvProblem& g, int64_t tokens, int slots, cudaStream_t stream) {
  // An expert holds at most T rows (a token picks an expert at most once): size the accumulators from T.
  if (tokens <= 1) return launch_gemv<T, F, EPI, 1>(g, slots, stream);
  if (tokens <= 2) return launch_gemv<T, F, EPI, 2>(g, slots, stream);
  if (tokens <= 4) return launch_gemv<T, F, EPI, 4>(g, slots, stream);
  if (tokens <= 8) return launch_gemv<T, F, EPI, 8>(g, slots, stream);
  return launch_gemv<T, F, EPI, kMaxChunkRows>(g, slots, stream);
}

template <typename T, WeightFormat F>
cudaError_t launch_experts_format(const MoeExpertsParams& p, cudaStream_t stream) {
  const int64_t rows = p.tokens * p.top_k;
  const int slots = static_cast<int>(rows < p.experts ? rows : p.experts);
  // K is split by the bytes of a row, not its length: a quantized row is shorter in memory and needs fewer warps.
  constexpr int64_t shrink = weights_per_vector<F>() / kVec;
  GemvProblem g1{p.w13, p.w13_scale, p.x, p.sorted_tokens, p.expert_offsets, p.inter, 2 * p.inter_size, p.hidden,
                 p.experts, choose_k_split(p.hidden / shrink)};
  cudaError_t err = launch_gemv_rows<T, F, Epilogue::kSiluMul>(g1, p.tokens, slots, stream);
  if (err != cudaSuccess) return err;
  GemvProblem g2{p.w2, p.w2_scale, p.inter, nullptr, p.expert_offsets, p.out_rows, p.hidden, p.inter_size,
                 p.experts, choose_k_split(p.inter_size / shrink)};
  return launch_gemv_rows<T, F, Epilogue::kStoreF32>(g2, p.tokens, slots, stream);
}

template <typename T>
cudaError_t launch_experts_typed(const MoeExpertsParams& p, cudaStream_t stream) {
  switch (p.wformat) {
    case WeightFormat::kDense: return launch_experts_format<T, WeightFormat::kDense>(p, stream);
    case WeightFormat::kInt8: return launch_experts_format<T, WeightFormat::kInt8>(p, stream);
    case WeightFormat::kInt4: return launch_experts_format<T, WeightFormat::kInt4>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_combine_typed(const CombineArgs& c, cudaStream_t stream) {
  const int64_t per_block = static_cast<int64_t>(kCombineThreads) * kVec;
  const dim3 grid(static_cast<unsigned>(c.tokens), static_cast<unsigned>((c.hidden + per_block - 1) / per_block));
  mixtral::launch(moe_experts_combine_kernel<T>, grid, kCombineThreads, 0, stream, c);
  return cudaGetLastError();
}

template <typename T, WeightFormat F>
cudaError_t launch_dequant_typed(const DequantArgs& d, cudaStream_t stream) {
  const int64_t per_block = static_cast<int64_t>(kCombineThreads) * kVec;
  const dim3 grid(static_cast<unsigned>(d.rows), static_cast<unsigned>((d.k + per_block - 1) / per_block));
  mixtral::launch(moe_experts_dequant_kernel<T, F>, grid, kCombineThreads, 0, stream, d);
  return cudaGetLastError();
}

}  // namespace

namespace moe_experts {

cudaError_t dequantize_run(const void* q, const float* scale, void* out, int64_t rows, int64_t k,
                           WeightFormat wformat, DType dtype, cudaStream_t stream) {
  const bool int8 = wformat == WeightFormat::kInt8;
  if ((!int8 && wformat != WeightFormat::kInt4) || rows < 0 || k <= 0 || k % (int8 ? 16 : kInt4Group) != 0 ||
      rows > 0x7fffffff)
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const DequantArgs d{q, scale, out, rows, k, wformat, dtype};
  switch (dtype) {
    case DType::kBFloat16:
      return int8 ? launch_dequant_typed<__nv_bfloat16, WeightFormat::kInt8>(d, stream)
                  : launch_dequant_typed<__nv_bfloat16, WeightFormat::kInt4>(d, stream);
    case DType::kFloat16:
      return int8 ? launch_dequant_typed<__half, WeightFormat::kInt8>(d, stream)
                  : launch_dequant_typed<__half, WeightFormat::kInt4>(d, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t decode_run(const MoeExpertsParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kBFloat16: return launch_experts_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_experts_typed<__half>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t combine_run(const MoeExpertsParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.hidden == 0) return cudaSuccess;
  const CombineArgs c{p.out_rows, p.topk_weights, p.token_rows, p.y, p.tokens, p.hidden, p.top_k, p.dtype};
  switch (p.dtype) {
    case DType::kBFloat16: return launch_combine_typed<__nv_bfloat16>(c, stream);
    case DType::kFloat16: return launch_combine_typed<__half>(c, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moe_experts
}  // namespace mixtral
