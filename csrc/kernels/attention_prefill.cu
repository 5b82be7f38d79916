// attention_prefill, sm_80 path (mma.sync + ldmatrix + cp.async; runs on sm_80 and every later GPU), plus the
// launcher that picks a path.
//
// Problem: out[t, h] = softmax_j(scale * q[t, h] . k[b, j, h / G]) v[b, j, h / G] over the keys j visible to the
// query's position p (j <= p, and p - j < W when a window W > 0 is set), for a packed varlen batch: sequence b owns
// q rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1 (n_b of them), its keys are cache slots 0 .. L_b-1 (L_b =
// seq_lens_k[b], a cached prefix then the n_b new tokens), and its query i sits at position p = L_b - n_b + i.
//
// Tiling. One block = 8 warps = 128 query rows x all D = 128 columns of one KV head kvh of one sequence. GQA is
// folded into M: block row r is (token tok0 + r / G, query head kvh * G + r % G), so the G query heads sharing a KV
// head read each K/V tile once (no copy of K/V per query head), and a row tile spans only 128 / G tokens, which
// keeps the causal diagonal narrow. Warp w owns rows 16w .. 16w+15. K and V tiles are 64 keys x 128 dims, double
// buffered with cp.async (tile i+1 in flight while tile i is used). Grid: (ceil(max_seqlen_q * G / 128), B, Hkv);
// blocks past a sequence's n_b exit at once; blockIdx.x is reversed so the longest (last) row tiles start first.
//
// Masking: for the block's valid rows, positions lie in [p_lo, p_hi]. Only key tiles [kv_begin, p_hi] are visited
// (tiles wholly after every row's position are skipped; with a window, so are tiles wholly before p_lo - W + 1).
// A tile needs the element mask only if it reaches past p_lo (causal) or, with a window, starts at or before
// p_hi - W; other tiles skip it. Keys at or past L are zero-filled by cp.async (src-size 0): a stale cache slot
// might hold NaN, and 0 * NaN in P V would poison the row.
//
// Numerics: S and O accumulate in fp32 (mma.sync .f32). Online softmax in fp32 in the exp2 domain: s2 =
// s * scale * log2(e) (the scale folded into one multiply), running max m (of s2), p = exp2(s2 - m), running sum
// l of the fp32 p, O rescaled by exp2(m_old - m_new) whenever the max grows. P is rounded to the input dtype only
// as the A operand of P V (as every flash kernel does). -inf handling: a masked score is -inf; if a row's max is
// still -inf (no visible key so far), the exponent base is taken as 0 so exp2(-inf - 0) = 0 and never
// exp2(-inf + inf) = NaN; at the end a row with l == 0 (no visible key at all, impossible for valid inputs since
// key p itself is visible) writes 0 instead of 0/0. Rows past n_b (padding in the last row tile) are computed on
// zero-filled Q and never stored.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type"; lane = 4 * g + t, g =
// groupID = lane / 4, t = threadID_in_group = lane % 4; every .b32 register holds two 16-bit elements, the lower
// column / k index in the low half):
//   A (16 x 16, row-major): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8, "col": k x n):  b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C/D (16 x 8, fp32):        c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// ldmatrix.m8n8.x4 (PTX "ldmatrix"): lanes 8m .. 8m+7 give the 8 row addresses (16 bytes each) of matrix m, and
// destination register m of lane l receives row l / 4, elements 2 (l % 4), 2 (l % 4) + 1 of matrix m; with .trans
// it receives the transposed matrix's row instead: stored elements [2 (l % 4)][l / 4] and [2 (l % 4) + 1][l / 4].
// Hence:
//   Q (A of S = Q K^T, rows x dims): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
//     (rows 8-15, k 8-15) give a0..a3 directly.
//   K (B of S = Q K^T with B[k = dim][n = key] = K[key][dim]): K is stored [key][dim], so a non-transposed 8x8 load
//     of (keys 0-7, dims 0-7) gives lane l K[key l/4][dim 2(l%4), +1] = b0. Matrices (keys 0-7, k 0-7),
//     (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15) give b0, b1 of key subtile 0 then of subtile 1.
//   V (B of O = P V with B[k = key][n = dim] = V[key][dim]): b0 needs two consecutive keys at one dim, so .trans:
//     matrices (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 8-15) give
//     b0, b1 of dim subtile 0 then of dim subtile 1.
//   P (A of P V) is S's C fragment re-packed in registers: for keys 16kk .. 16kk+15, a0 = pack(S[2kk].c0, c1),
//     a1 = pack(S[2kk].c2, c3), a2 = pack(S[2kk+1].c0, c1), a3 = pack(S[2kk+1].c2, c3) (same rows, same columns).
//
// Shared memory (96 KiB dynamic): Q [128][128], K [2][64][128], V [2][64][128], each row 256 bytes = 16 chunks of
// 16 bytes stored at chunk position (c ^ (row & 7)). An ldmatrix phase reads 8 rows at one logical chunk; the XOR
// sends them to 8 distinct 16-byte slots of a 128-byte bank line, so neither ldmatrix nor the 16-byte cp.async
// writes conflict. Q's rows are reused as the output staging buffer (each warp reads and writes only its rows).
//
// Limits: D = 128, bf16 / fp16, 128 % G == 0, inner dim contiguous and 16-byte aligned rows (checked by ops.cpp).
#include "attention_prefill.h"
#include "device.cuh"
#include "arch/sm80.cuh"

namespace mixtral {
namespace {

constexpr int kD = 128;
constexpr int kBM = kAttnPrefillRowsPerBlock;  // query rows (token, head) per block
constexpr int kBN = 64;                        // keys per tile
constexpr int kWarps = kBM / 16;
constexpr int kThreads = kWarps * 32;
constexpr int kRowBytes = kD * 2;
constexpr int kChunks = kRowBytes / 16;        // 16-byte chunks per row
constexpr int kQBytes = kBM * kRowBytes;
constexpr int kTileBytes = kBN * kRowBytes;
constexpr int kSmemBytes = kQBytes + 4 * kTileBytes;  // Q + 2 stages of (K, V)
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kD == 128 && kChunks == 16, "the swizzle and fragment loops assume D = 128");
static_assert(kBM == 128 && kWarps == 8, "one warp per 16 query rows, 8 warps");
static_assert(kBN % 16 == 0 && (kBN * kChunks) % kThreads == 0 && (kBM * kChunks) % kThreads == 0,
              "tile loads are whole multiples of the block's 16-byte copies");

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][128] tile.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

template <typename T> struct MmaOp;
template <> struct MmaOp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16_row_col_f32_bf16_bf16_f32(c, a, b0, b1);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <> struct MmaOp<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16_row_col_f32_f16_f16_f32(c, a, b0, b1);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// Loads keys j0 .. j0+kBN-1 of one KV head (k or v cache) into a swizzled tile; keys >= L are zero-filled.
template <typename T>
__device__ __forceinline__ void load_kv_tile(uint32_t dst, const T* head_base, int64_t stride_s, int j0, int L,
                                             int tid) {
#pragma unroll
  for (int i = 0; i < kBN * kChunks / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int row = idx / kChunks, chunk = idx % kChunks;
    const int j = j0 + row;
    const bool valid = j >= 0 && j < L;
    const T* src = valid ? head_base + static_cast<int64_t>(j) * stride_s + chunk * 8 : head_base;
    cp_async_cg_16(dst + swz(row, chunk), src, valid ? 16 : 0);  // src-size 0: zero-fill, src not read
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attention_prefill_sm80_kernel(const AttentionPrefillParams p) {
  using Mma = MmaOp<T>;
  MX_DYNAMIC_SHARED(uint8_t, smem, 128);
  const uint32_t s_q = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t s_k = s_q + kQBytes;             // stage s at s_k + s * kTileBytes
  const uint32_t s_v = s_k + 2 * kTileBytes;      // stage s at s_v + s * kTileBytes

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int b = blockIdx.y, kvh = blockIdx.z;
  const int mblk = gridDim.x - 1 - blockIdx.x;
  const int G = p.q_heads / p.kv_heads;
  const int tpb = kBM / G;  // tokens per block
  const int q_begin = p.cu_seqlens_q[b];
  const int n = p.cu_seqlens_q[b + 1] - q_begin;
  const int tok0 = mblk * tpb;
  if (tok0 >= n) return;
  // L is clamped to the cache length so a bad seq_lens_k cannot read past the cache (valid inputs: n <= L <= S).
  const int L = min(p.seq_lens_k[b], p.cache_len);
  const int pos0 = L - n;  // position of the sequence's first new token
  const int p_lo = pos0 + tok0;
  const int p_hi = pos0 + min(tok0 + tpb, n) - 1;
  const int kv_begin = p.window > 0 ? max(0, p_lo - p.window + 1) / kBN * kBN : 0;
  const int n_tiles = p_hi + 1 > kv_begin ? (p_hi + 1 - kv_begin + kBN - 1) / kBN : 0;

  const T* k_head = static_cast<const T*>(p.k_cache) + b * p.k_stride_b + kvh * p.k_stride_h;
  const T* v_head = static_cast<const T*>(p.v_cache) + b * p.v_stride_b + kvh * p.v_stride_h;

  // Prologue: group 0 = Q + tile 0, group 1 = tile 1 (possibly empty). One group is committed per loop iteration
  // too, so before using tile i, "all but the newest group complete" means tiles 0 .. i have landed.
  {
    const T* q = static_cast<const T*>(p.q);
#pragma unroll
    for (int i = 0; i < kBM * kChunks / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int row = idx / kChunks, chunk = idx % kChunks;
      const int tok = tok0 + row / G;
      const bool valid = tok < n;
      const T* src = valid ? q + static_cast<int64_t>(q_begin + tok) * p.q_stride_t +
                                 static_cast<int64_t>(kvh * G + row % G) * p.q_stride_h + chunk * 8
                           : q;
      cp_async_cg_16(s_q + swz(row, chunk), src, valid ? 16 : 0);
    }
  }
  load_kv_tile(s_k, k_head, p.k_stride_s, kv_begin, L, tid);
  load_kv_tile(s_v, v_head, p.v_stride_s, kv_begin, L, tid);
  cp_async_commit_group();
  if (n_tiles > 1) {
    load_kv_tile(s_k + kTileBytes, k_head, p.k_stride_s, kv_begin + kBN, L, tid);
    load_kv_tile(s_v + kTileBytes, v_head, p.v_stride_s, kv_begin + kBN, L, tid);
  }
  cp_async_commit_group();

  // This thread's two rows (g and g + 8 of the warp's 16) and their positions; rows past n get positions >= L,
  // harmless since they are never stored.
  const int row0 = warp * 16 + g;
  int pos[2];
  pos[0] = pos0 + tok0 + row0 / G;
  pos[1] = pos0 + tok0 + (row0 + 8) / G;
  const float sl2 = p.scale * kLog2e;

  uint32_t qf[kD / 16][4];     // Q fragments, k chunk kk = dims 16kk .. 16kk+15
  float o[kD / 8][4];          // O accumulator, dim subtile dn = dims 8dn .. 8dn+7
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};     // this thread's partial row sums (its columns only; reduced across the quad at end)
#pragma unroll
  for (int dn = 0; dn < kD / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;

  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait_group<1>();
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const int r = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int c = 2 * kk + ((lane >> 4) & 1);
        ldmatrix_x4(s_q + swz(r, c), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
      }
    }
    const int stage = it & 1;
    const uint32_t sk = s_k + stage * kTileBytes, sv = s_v + stage * kTileBytes;
    const int j0 = kv_begin + it * kBN;

    // S = Q K^T: 16 rows x 64 keys per warp, key subtile nt = keys 8nt .. 8nt+7.
    float s[kBN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t b0, b1, b2, b3;
        const int key = 16 * np + (lane & 7) + ((lane >> 4) & 1) * 8;
        const int c = 2 * kk + ((lane >> 3) & 1);
        ldmatrix_x4(sk + swz(key, c), b0, b1, b2, b3);
        Mma::run(s[2 * np], qf[kk], b0, b1);
        Mma::run(s[2 * np + 1], qf[kk], b2, b3);
      }
    }

    // Scale into the log2 domain and mask. Element e of s[nt] is row (e / 2) of this thread, key j0 + 8nt + 2t + e%2.
    const bool need_mask = j0 + kBN - 1 > p_lo || (p.window > 0 && j0 <= p_hi - p.window);
    if (need_mask) {
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = j0 + 8 * nt + 2 * tq + (e & 1);
          const int ps = pos[e >> 1];
          const bool visible = j <= ps && (p.window <= 0 || ps - j < p.window);
          s[nt][e] = visible ? s[nt][e] * sl2 : -INFINITY;
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= sl2;
      }
    }

    // Online softmax. A row is spread over the 4 lanes of a quad (same g), so reduce with xor 1 and 2.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = m[h];
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
      mx = quad_max(mx);
      const float base = mx == -INFINITY ? 0.f : mx;   // see the header: never -inf - (-inf)
      const float alpha = ex2_approx_ftz_f32(m[h] - base);      // m[h] = -inf -> 0 (and O, l are still 0 then)
      m[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        s[nt][2 * h] = ex2_approx_ftz_f32(s[nt][2 * h] - base);
        s[nt][2 * h + 1] = ex2_approx_ftz_f32(s[nt][2 * h + 1] - base);
        sum += s[nt][2 * h] + s[nt][2 * h + 1];
      }
      l[h] = l[h] * alpha + sum;
#pragma unroll
      for (int dn = 0; dn < kD / 8; ++dn) {
        o[dn][2 * h] *= alpha;
        o[dn][2 * h + 1] *= alpha;
      }
    }

    // O += P V, P re-packed from S's accumulators (see the header), keys 16kk .. 16kk+15 per k step.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pa[4] = {Mma::pack(s[2 * kk][0], s[2 * kk][1]), Mma::pack(s[2 * kk][2], s[2 * kk][3]),
                              Mma::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              Mma::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t b0, b1, b2, b3;
        const int key = 16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int c = 2 * dp + ((lane >> 4) & 1);
        ldmatrix_x4_trans(sv + swz(key, c), b0, b1, b2, b3);
        Mma::run(o[2 * dp], pa, b0, b1);
        Mma::run(o[2 * dp + 1], pa, b2, b3);
      }
    }

    // Every warp is done with this stage before it is refilled with tile it + 2.
    __syncthreads();
    if (it + 2 < n_tiles) {
      load_kv_tile(sk, k_head, p.k_stride_s, j0 + 2 * kBN, L, tid);
      load_kv_tile(sv, v_head, p.v_stride_s, j0 + 2 * kBN, L, tid);
    }
    cp_async_commit_group();
  }
  // With n_tiles == 0 (only for invalid L < n) the Q copies may still be in flight: drain before reusing Q's smem.
  cp_async_wait_group<0>();
  __syncthreads();

  // Epilogue: normalise, stage the warp's 16 rows in its own Q rows (swizzled), then 16-byte coalesced stores.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float inv = inv_or_zero(quad_sum(l[h]));
    const int r = row0 + 8 * h;
#pragma unroll
    for (int dn = 0; dn < kD / 8; ++dn) {
      const uint32_t v = Mma::pack(o[dn][2 * h] * inv, o[dn][2 * h + 1] * inv);
      // dims 8dn + 2t, +1: chunk dn, byte 4t within it
      st_shared_b32(s_q + swz(r, dn) + 4 * tq, v);
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < 16 * kChunks / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = warp * 16 + idx / kChunks, chunk = idx % kChunks;
    const int tok = tok0 + r / G;
    if (tok < n) {
      uint4 v;
      ld_shared_v4_b32(s_q + swz(r, chunk), v);
      *reinterpret_cast<uint4*>(out + (static_cast<int64_t>(q_begin + tok) * p.q_heads + kvh * G + r % G) * kD +
                                chunk * 8) = v;
    }
  }
}

template <typename T>
cudaError_t launch_sm80(const AttentionPrefillParams& p, cudaStream_t stream) {
  const int G = p.q_heads / p.kv_heads;
  const int tpb = kBM / G;
  const dim3 grid((p.max_seqlen_q + tpb - 1) / tpb, p.batch, p.kv_heads);
  cudaError_t err = cudaFuncSetAttribute(attention_prefill_sm80_kernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  mixtral::launch(attention_prefill_sm80_kernel<T>, grid, kThreads, kSmemBytes, stream, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_prefill_sm80_launch(const AttentionPrefillParams& p, cudaStream_t stream) {
  if (p.head_dim != kD || p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 ||
      kBM % (p.q_heads / p.kv_heads) != 0)
    return cudaErrorInvalidValue;
  if (p.max_seqlen_q <= 0 || p.batch <= 0) return cudaSuccess;  // nothing to compute
  switch (p.dtype) {
    case DType::kBFloat16: return launch_sm80<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_sm80<__half>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t attention_prefill_launch(const AttentionPrefillParams& p, AttnPath path, cudaStream_t stream) {
  return path == AttnPath::kSm90 ? attention_prefill_sm90_launch(p, stream) : attention_prefill_sm80_launch(p, stream);
}

}  // namespace mixtral
