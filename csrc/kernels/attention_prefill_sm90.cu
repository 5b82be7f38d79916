// attention_prefill, Hopper path (sm_90a): wgmma, a 3-stage mbarrier ring of K/V tiles, warp specialisation.
//
// Same problem, GQA folding, grid, tile-range and masking rules as the sm_80 path (attention_prefill.cu: read its
// header first); only the tile sizes and the machinery differ. One block = 3 warpgroups (384 threads) for 128 query
// rows (token, head) of one KV head of one sequence:
//   warpgroup 0, producer (setmaxnreg.dec to 40 registers): copies Q once, then each 128-key K and V tile into
//     stage it % 3 of a shared-memory ring with 16-byte cp.async (src-size 0 zero-fills keys >= L, which a TMA box
//     could not do per sequence: stale cache slots may hold NaN). Per tile and thread: wait for the stage's "empty"
//     barrier (the consumers' release of tile it - 3), issue, commit; then wait for the previous tile's group,
//     fence.proxy.async (the copies are generic-proxy writes that wgmma reads through the async proxy) and arrive
//     on that tile's "full" barrier (128 arrivals). Tile it is in flight while tile it - 1 is announced.
//   warpgroups 1 and 2, consumers (setmaxnreg.inc to 232): rows 64c .. 64c+63 each. Per tile it: wait "full";
//     on this warpgroup's turn (below) issue the previous tile's O += P V (2 x 8 wgmma.m64n64k16: A = P from
//     registers, B = V from shared memory, N-major: imm-trans-b = 1) and then S = Q K^T (8 wgmma.m64n128k16: A = Q
//     and B = K from shared memory, both K-major); hand the turn over; one wait_group retires both; release the
//     previous tile's stage ("empty", 256 arrivals); mask and online softmax on S's registers (as in the sm_80
//     path); re-pack P in registers as the next A operand. The last tile's P V follows the loop.
//     Turns (FA3-style ping-pong, two named barriers): the warpgroups alternate issuing their matmuls, so one
//     warpgroup's softmax runs while the other's matmuls occupy the tensor cores, and within a warpgroup the
//     P V of tile it - 1 and the S of tile it run back to back.
//
// wgmma facts used (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//   Accumulator D of m64nNk16 (f32): warp w of the warpgroup holds rows 16w .. 16w+15; with g = lane / 4,
//     t = lane % 4, register d[4i + e] is row 16w + g + 8 (e / 2), column 8i + 2t + (e % 2) - the mma.sync C layout
//     repeated along N. A from registers (4 x .b32 per thread) is the mma.m16n8k16 A layout on the warp's 16 rows:
//     a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..). So P re-packs from S exactly as
//     in the sm_80 path: keys 16kk .. 16kk+15 are S registers 8kk .. 8kk+7.
//   Shared-memory matrix descriptor (64 bits): [0,14) start address >> 4, [16,30) leading-dimension byte offset
//     (LBO) >> 4, [32,46) stride-dimension byte offset (SBO) >> 4, [49,52) base offset (0: every swizzle pattern
//     starts on a 1024-byte boundary here), [62,64) layout: 1 = 128-byte swizzle.
//   128-byte swizzle atom: 8 rows of 128 bytes, 1024 bytes contiguous and 1024-aligned; 16-byte chunk c of row r
//     is stored at chunk position c ^ (r % 8) (the hardware XORs address bits [4,7) with bits [7,10)).
//   Our tiles (Q, K and V alike): [2 column halves of 64 elements][128 rows][128 bytes], swizzled as above, so
//     element (row r, column x) lives at (x / 64) * 16384 + r * 128 + (((x % 64) / 8) ^ (r % 8)) * 16 + (x % 8) * 2.
//   K-major operand (Q as A, K as B of S = Q K^T; rows = M or N, columns = K = head dim): SBO = 1024 (next 8 rows);
//     LBO unused for swizzled K-major (set to 1 as the ISA says it assumes); the k-step kk (16 columns = 32 bytes)
//     starts at half (kk / 4), byte (kk % 4) * 32 inside the 128-byte row - the hardware applies the swizzle to
//     the computed address, which is why the atoms must be 1024-aligned.
//   N-major operand (V as B of O = P V: K = keys = tile rows, N = head dim = contiguous): the swizzle atom is 64 N
//     elements x 8 K rows; one atom step along K (8 keys) is 1024 bytes and one along N (64 dims) is 16384. Each
//     wgmma here has N = 64, i.e. one atom wide, so only the K-direction stride is ever used; it is written into
//     both LBO and SBO (1024), which keeps the descriptor right whichever of the two fields the ISA's "MN-major"
//     wording assigns to it. k-step kk (keys 16kk ..) starts at kk * 2048, the N half h at h * 16384.
//   Ordering: wgmma.fence before the first wgmma of a batch whose register operands (accumulators, P) ordinary
//     code wrote; commit_group; wait_group 0 before reading the accumulators (keep_regs, arch/sm90.cuh, pins every
//     accumulator so the compiler does not touch them earlier).
//
// Shared memory: 1024-aligned base; Q 32 KiB, 3 stages x (K 32 KiB + V 32 KiB), 6 mbarriers: 225 KiB + alignment.
// Limits as the sm_80 path. The kernel body exists only in the sm_90a pass (and the emulation build); other passes
// trap, and the host asks attention_prefill_sm90_available() (the loaded binary's architecture) before choosing
// this path.
#include "attention_prefill.h"
#include "device.cuh"
#include "arch/sm80.cuh"
#include "arch/sm90.cuh"

#include <type_traits>

namespace mixtral {
namespace {

constexpr int kD = 128;
constexpr int kBM = kAttnPrefillRowsPerBlock;  // 128 query rows per block, 64 per consumer warpgroup
constexpr int kBN = 128;                       // keys per tile
constexpr int kStages = 3;
constexpr int kThreads = 384;
constexpr int kHalfBytes = 128 * 128;          // one 64-column half of a 128-row tile
constexpr int kTileBytes = 2 * kHalfBytes;     // 128 rows x 128 columns x 2 bytes
constexpr int kKOff = kTileBytes;
constexpr int kVOff = kKOff + kStages * kTileBytes;
constexpr int kBarOff = kVOff + kStages * kTileBytes;
constexpr int kSmemBytes = kBarOff + 64 + 1024;  // barriers, and slack to align the base to 1024
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
static_assert(kBM == 128 && kBN == 128 && kD == 128, "tile shapes are fixed: 2 x 64 rows, 128 keys, D = 128");
static_assert(kProducerRegs * 128 + kConsumerRegs * 256 <= 65536, "setmaxnreg budgets exceed the register file");
static_assert(kSmemBytes <= 232448, "over the sm_90 227 KiB dynamic shared-memory limit");

#ifdef MIXTRAL_SM90A
using namespace sm90;
constexpr float kLog2e = 1.4426950408889634f;

// Byte offset of 16-byte chunk c (0..15) of row r in a [2][128][128 B] swizzled tile (see the header).
__device__ __forceinline__ uint32_t sw128(int r, int c) {
  return static_cast<uint32_t>((c >> 3) * kHalfBytes + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// The producer's wait, with the watchdog of arch/sm90.cuh (a trap also ends consumers stuck on a "full" barrier).
// The consumers keep the plain wait: a timer there costs registers the wgmma pipeline needs (ptxas then serialises the
// wgmmas).
__device__ __forceinline__ void mbar_wait_watchdog(uint32_t bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const uint64_t t0 = globaltimer_ns();
  while (!mbar_try_wait(bar, parity)) {
    if (globaltimer_ns() - t0 > kWatchdogNs) __trap();
  }
}

// S (64 x 128, f32) (+)= A (64 x 16, smem) * B (16 x 128, smem), both K-major; accumulate iff acc != 0.
// O (64 x 64, f32) += A (64 x 16, registers) * B (16 x 64, smem, N-major: imm-trans-b = 1).
template <typename T> struct Wgmma {
  __device__ __forceinline__ static void ss(float (&d)[64], uint64_t da, uint64_t db, int acc) {
    wgmma_m64n128k16_f32_ss<T>(d, da, db, acc);
  }
  __device__ __forceinline__ static void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
    wgmma_m64n64k16_f32_rs_transb<T>(d, a, db);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
      return *reinterpret_cast<uint32_t*>(&v);
    } else {
      __half2 v = __floats2half2_rn(lo, hi);
      return *reinterpret_cast<uint32_t*>(&v);
    }
  }
};

// The block's slice of the problem: shared by the producer and the consumers so both walk the same tiles.
struct BlockGeom {
  int G, tok0, n, q_begin, L, pos0, p_lo, p_hi, kv_begin, n_tiles;
};

__device__ __forceinline__ bool block_geom(const AttentionPrefillParams& p, BlockGeom& bg) {
  bg.G = p.q_heads / p.kv_heads;
  const int tpb = kBM / bg.G;
  bg.q_begin = p.cu_seqlens_q[blockIdx.y];
  bg.n = p.cu_seqlens_q[blockIdx.y + 1] - bg.q_begin;
  bg.tok0 = (gridDim.x - 1 - blockIdx.x) * tpb;  // reversed: the longest row tiles start first
  if (bg.tok0 >= bg.n) return false;
  bg.L = min(p.seq_lens_k[blockIdx.y], p.cache_len);
  bg.pos0 = bg.L - bg.n;
  bg.p_lo = bg.pos0 + bg.tok0;
  bg.p_hi = bg.pos0 + min(bg.tok0 + tpb, bg.n) - 1;
  bg.kv_begin = p.window > 0 ? max(0, bg.p_lo - p.window + 1) / kBN * kBN : 0;
  bg.n_tiles = bg.p_hi + 1 > bg.kv_begin ? (bg.p_hi + 1 - bg.kv_begin + kBN - 1) / kBN : 0;
  return true;
}
#endif  // MIXTRAL_SM90A

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attention_prefill_sm90_kernel(const AttentionPrefillParams p) {
#ifdef MIXTRAL_SM90A
  MX_DYNAMIC_SHARED(uint8_t, smem_raw, 16);
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t s_q = base, s_k = base + kKOff, s_v = base + kVOff;
  const uint32_t full_bar = base + kBarOff;  // full[s] at full_bar + 8 s, empty[s] at empty_bar + 8 s
  const uint32_t empty_bar = full_bar + 8 * kStages;

  BlockGeom bg;
  if (!block_geom(p, bg)) return;  // uniform over the block, before any barrier
  const int kvh = blockIdx.z;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_bar + 8 * s, 128);
      mbar_init(empty_bar + 8 * s, 256);
    }
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // ---------------- producer ----------------
    setmaxnreg_dec<kProducerRegs>();
    const int tid = threadIdx.x;
    const T* q = static_cast<const T*>(p.q);
#pragma unroll 4
    for (int i = 0; i < kBM * 16 / 128; ++i) {
      const int idx = tid + i * 128;
      const int row = idx >> 4, c = idx & 15;
      const int tok = bg.tok0 + row / bg.G;
      const bool valid = tok < bg.n;
      const T* src = valid ? q + static_cast<int64_t>(bg.q_begin + tok) * p.q_stride_t +
                                 static_cast<int64_t>(kvh * bg.G + row % bg.G) * p.q_stride_h + c * 8
                           : q;
      cp_async_cg_16(s_q + sw128(row, c), src, valid ? 16 : 0);  // src-size 0: zero-fill, src not read
    }
    const T* k_head = static_cast<const T*>(p.k_cache) + blockIdx.y * p.k_stride_b + kvh * p.k_stride_h;
    const T* v_head = static_cast<const T*>(p.v_cache) + blockIdx.y * p.v_stride_b + kvh * p.v_stride_h;
    for (int it = 0; it < bg.n_tiles; ++it) {
      const int s = it % kStages;
      if (it >= kStages) mbar_wait_watchdog(empty_bar + 8 * s, ((it / kStages) - 1) & 1);
      const int j0 = bg.kv_begin + it * kBN;
#pragma unroll 4
      for (int i = 0; i < kBN * 16 / 128; ++i) {
        const int idx = tid + i * 128;
        const int row = idx >> 4, c = idx & 15;
        const int j = j0 + row;
        const bool valid = j < bg.L;
        const uint32_t off = s * kTileBytes + sw128(row, c);
        cp_async_cg_16(s_k + off, valid ? k_head + static_cast<int64_t>(j) * p.k_stride_s + c * 8 : k_head,
                       valid ? 16 : 0);
        cp_async_cg_16(s_v + off, valid ? v_head + static_cast<int64_t>(j) * p.v_stride_s + c * 8 : v_head,
                       valid ? 16 : 0);
      }
      cp_async_commit_group();
      if (it >= 1) {  // the previous tile (and Q with tile 0) has landed: publish it
        cp_async_wait_group<1>();
        fence_proxy_async();
        mbar_arrive(full_bar + 8 * ((it - 1) % kStages));
      }
    }
    cp_async_wait_group<0>();
    if (bg.n_tiles >= 1) {
      fence_proxy_async();
      mbar_arrive(full_bar + 8 * ((bg.n_tiles - 1) % kStages));
    }
  } else {
    // ---------------- consumers ----------------
    setmaxnreg_inc<kConsumerRegs>();
    using W = Wgmma<T>;
    // O (+)= P V for one tile: 8 k-steps of 16 keys, each as two N = 64 halves of the head dim.
    auto pv_issue = [](float (&o)[2][32], const uint32_t (&pa)[kBN / 16][4], uint32_t sv) {
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        W::rs(o[0], pa[kk], desc_sw128_nmajor(sv + kk * 2048));
        W::rs(o[1], pa[kk], desc_sw128_nmajor(sv + kHalfBytes + kk * 2048));
      }
    };
    const int cw = wg - 1;                       // consumer warpgroup: rows 64 cw .. 64 cw + 63
    const int ct = threadIdx.x - 128 * wg;       // thread within the warpgroup
    const int warp = ct >> 5, lane = ct & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int row0 = 64 * cw + 16 * warp + g;   // this thread's rows: row0 and row0 + 8
    int pos[2];
    pos[0] = bg.pos0 + bg.tok0 + row0 / bg.G;
    pos[1] = bg.pos0 + bg.tok0 + (row0 + 8) / bg.G;
    const float sl2 = p.scale * kLog2e;

    float s[64];
    float o[2][32];  // O for dims 0..63 and 64..127
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 64; ++i) s[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) o[0][i] = o[1][i] = 0.f;

    // P of the previous tile stays live (and untouched) until the wait that retires the P V reading it.
    uint32_t pa[kBN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) pa[kk][0] = pa[kk][1] = pa[kk][2] = pa[kk][3] = 0u;
    // Ping-pong between the consumer warpgroups (named barriers 3 and 4, 256 threads: one warpgroup syncs, the
    // other arrives): warpgroup c issues its matmuls only on its turn, then hands the turn over, so one
    // warpgroup's softmax runs while the other's matmuls occupy the tensor cores. Warpgroup 1 hands warpgroup 0
    // the first turn and skips its hand-over after its last tile, so every arrival meets exactly one sync.
    const uint32_t my_turn = 3 + cw, their_turn = 4 - cw;
    if (cw == 1 && bg.n_tiles > 0) bar_arrive<256>(their_turn);
    for (int it = 0; it < bg.n_tiles; ++it) {
      const int st = it % kStages;
      mbar_wait(full_bar + 8 * st, (it / kStages) & 1);
      const uint32_t sk = s_k + st * kTileBytes;

      // On this warpgroup's turn: the previous tile's O += P V (see below), then S = Q K^T over the head dim in
      // 8 k-steps of 16; one wait retires both. At it = 0 there is no previous tile: P is still all zeros and V
      // is taken from the current (landed, finite) stage, so O stays 0; issuing it anyway keeps every wgmma on a
      // non-divergent path (ptxas serialises wgmma under a branch).
      bar_sync<256>(my_turn);
      wgmma_fence();
      pv_issue(o, pa, s_v + ((it > 0 ? it - 1 : it) % kStages) * kTileBytes);
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t koff = (kk >> 2) * kHalfBytes + (kk & 3) * 32;
        W::ss(s, desc_sw128_kmajor(s_q + 64 * cw * 128 + koff), desc_sw128_kmajor(sk + koff), kk > 0);
      }
      wgmma_commit();
      if (!(cw == 1 && it == bg.n_tiles - 1)) bar_arrive<256>(their_turn);
      wgmma_wait<0>();
      keep_regs(s);
      keep_regs(o[0]);
      keep_regs(o[1]);
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) keep_regs(pa[kk]);
      if (it > 0) mbar_arrive(empty_bar + 8 * ((it - 1) % kStages));  // done reading the previous stage's V

      // Mask and scale into the log2 domain: s[4i + e] is row (e / 2), key j0 + 8i + 2t + e % 2.
      const int j0 = bg.kv_begin + it * kBN;
      const bool need_mask = j0 + kBN - 1 > bg.p_lo || (p.window > 0 && j0 <= bg.p_hi - p.window);
      if (need_mask) {
#pragma unroll
        for (int i = 0; i < 64; ++i) {
          const int j = j0 + 8 * (i >> 2) + 2 * tq + (i & 1);
          const int ps = pos[(i >> 1) & 1];
          const bool visible = j <= ps && (p.window <= 0 || ps - j < p.window);
          s[i] = visible ? s[i] * sl2 : -INFINITY;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 64; ++i) s[i] *= sl2;
      }

      // Online softmax (see attention_prefill.cu for the -inf rules); a row spans the 4 lanes of a quad.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = m[h];
#pragma unroll
        for (int i = 0; i < 16; ++i) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * h], s[4 * i + 2 * h + 1]));
        mx = quad_max(mx);
        const float base_m = mx == -INFINITY ? 0.f : mx;
        const float alpha = ex2_approx_ftz_f32(m[h] - base_m);
        m[h] = mx;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          s[4 * i + 2 * h] = ex2_approx_ftz_f32(s[4 * i + 2 * h] - base_m);
          s[4 * i + 2 * h + 1] = ex2_approx_ftz_f32(s[4 * i + 2 * h + 1] - base_m);
          sum += s[4 * i + 2 * h] + s[4 * i + 2 * h + 1];
        }
        l[h] = l[h] * alpha + sum;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          o[0][4 * i + 2 * h] *= alpha;
          o[0][4 * i + 2 * h + 1] *= alpha;
          o[1][4 * i + 2 * h] *= alpha;
          o[1][4 * i + 2 * h + 1] *= alpha;
        }
      }

      // P for keys 16kk .. 16kk+15 is S registers 8kk .. 8kk+7, re-packed as the A fragment; O += P V is issued
      // with the next tile's S (or after the loop).
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        pa[kk][0] = W::pack(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = W::pack(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = W::pack(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = W::pack(s[8 * kk + 6], s[8 * kk + 7]);
      }
    }
    // The last tile's P V (unconditional for the same reason; with no tile at all O is never read).
    wgmma_fence();
    pv_issue(o, pa, s_v + ((bg.n_tiles + kStages - 1) % kStages) * kTileBytes);
    wgmma_commit();
    wgmma_wait<0>();
    keep_regs(o[0]);
    keep_regs(o[1]);

    // Epilogue: normalise; stage the warpgroup's 64 rows in its own Q rows (its last wgmma reading them has
    // completed; the other warpgroup never reads them), then 16-byte coalesced stores. With no tile at all (only
    // for invalid L < n) Q's copies may still be landing, so zeros go straight to global memory instead.
    T* out = static_cast<T*>(p.out);
    const uint32_t named_bar = 1 + cw;
    if (bg.n_tiles > 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float inv = inv_or_zero(quad_sum(l[h]));
        const int r = row0 + 8 * h;
#pragma unroll
        for (int i = 0; i < 16; ++i) {  // dims 8i + 2t, +1: chunk i of the row, bytes 4t .. 4t+3
          const float* oo = o[i >> 3];
          const int e = 4 * (i & 7) + 2 * h;
          const uint32_t v = W::pack(oo[e] * inv, oo[e + 1] * inv);
          st_shared_b32(s_q + sw128(r, i) + 4 * tq, v);
        }
      }
      bar_sync<128>(named_bar);
    }
#pragma unroll
    for (int i = 0; i < 64 * 16 / 128; ++i) {
      const int idx = ct + i * 128;
      const int r = 64 * cw + (idx >> 4), c = idx & 15;
      const int tok = bg.tok0 + r / bg.G;
      if (tok < bg.n) {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (bg.n_tiles > 0) ld_shared_v4_b32(s_q + sw128(r, c), v);
        *reinterpret_cast<uint4*>(out + (static_cast<int64_t>(bg.q_begin + tok) * p.q_heads + kvh * bg.G +
                                         r % bg.G) * kD + c * 8) = v;
      }
    }
  }
#else
  __trap();  // built without sm_90a: the host never picks this kernel (attention_prefill_sm90_available)
#endif
}

template <typename T>
cudaError_t launch_sm90(const AttentionPrefillParams& p, cudaStream_t stream) {
  const int tpb = kBM / (p.q_heads / p.kv_heads);
  const dim3 grid((p.max_seqlen_q + tpb - 1) / tpb, p.batch, p.kv_heads);
  cudaError_t err = cudaFuncSetAttribute(attention_prefill_sm90_kernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  mixtral::launch(attention_prefill_sm90_kernel<T>, grid, kThreads, kSmemBytes, stream, p);
  return cudaGetLastError();
}

// setmaxnreg only moves registers within the CTA's pool (384 x R, R = the kernel's register count): the producer
// warpgroup returns 128 x (R - kProducerRegs), the consumers then take 256 x (kConsumerRegs - R), and their
// setmaxnreg.inc waits until the pool holds that many - forever if it never will. ptxas gives this kernel the
// __launch_bounds__(384, 1) maximum, R = 168, which balances exactly (and no larger R fits those bounds); a compiler
// that chose fewer registers would hang every block, so such a binary is declined (as moe_experts_sm90's regs_ok does)
// and attention_prefill_sm90_launch runs the sm_80 path instead.
template <typename T>
bool regs_ok() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, attention_prefill_sm90_kernel<T>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return 128 * (attr.numRegs - kProducerRegs) >= 256 * (kConsumerRegs - attr.numRegs);
}

}  // namespace

bool attention_prefill_sm90_available() {
  // The binary the runtime would load for the current device: sm_90a code reports 90; a build without the sm_90a
  // pass gives the sm_80 binary (80) or no binary at all. A register count the setmaxnreg split cannot run with
  // (regs_ok) makes the path unavailable too.
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, attention_prefill_sm90_kernel<__nv_bfloat16>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.binaryVersion >= 90 && regs_ok<__nv_bfloat16>() && regs_ok<__half>();
}

cudaError_t attention_prefill_sm90_launch(const AttentionPrefillParams& p, cudaStream_t stream) {
  if (p.head_dim != kD || p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 ||
      kBM % (p.q_heads / p.kv_heads) != 0)
    return cudaErrorInvalidValue;
  if (p.max_seqlen_q <= 0 || p.batch <= 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kBFloat16:
      return regs_ok<__nv_bfloat16>() ? launch_sm90<__nv_bfloat16>(p, stream) : attention_prefill_sm80_launch(p, stream);
    case DType::kFloat16:
      return regs_ok<__half>() ? launch_sm90<__half>(p, stream) : attention_prefill_sm80_launch(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mixtral
