// attention_decode: one query token per sequence against the KV cache (decode step), split-KV + log-sum-exp combine.
//
// Grid: (split, kv head h, sequence b). A block of 4 warps handles ALL G = Hq / Hkv query heads of kv head h for
// its split, so K and V of the head are read from memory once. The split covers a contiguous key range of the
// visible window; the number of splits is fixed on the host from the static shapes (attention_decode_num_splits),
// the key ranges are derived on the device from seq_lens[b]:
//   visible keys [vis_lo, vis_hi) with vis_hi = seq_lens[b], vis_lo = max(0, vis_hi - W) if W > 0 else 0
//   (key j visible iff j <= p and (W == 0 or p - j < W), p = seq_lens[b] - 1: the reference's rule);
//   per_split = ceil(vis_len / splits) rounded up to a tile; split s takes [vis_lo + s * per_split, ...) ∩ visible.
//
// Memory pipeline: tiles of 32 keys; K and V rows of a tile (32 x D each) are copied global -> shared memory with
// 16-byte cp.async.cg (coalesced: consecutive threads copy consecutive 16-byte pieces of 256-byte rows), 3 stages,
// so two tiles are in flight while one is computed. Keys past the split end are zero-filled (src-size 0), never
// read from memory, and masked to -inf.
//
// Compute: each half-warp owns 4 keys of the tile, each lane D / 16 columns (8 for D = 128) of every row. Per
// key, a lane forms G partial dot products with the pre-scaled q it holds in registers; the 4G partial sums of the
// half-warp are reduced with a "transposing" butterfly (about 4G shuffles instead of 16G), which leaves each
// lane the full score of one or two (key, head) pairs. Online softmax per warp: running max m and sum l per head,
// the accumulators rescaled once per tile; P·V with p broadcast by shuffle from the lane that owns the score.
// At the end the two half-warps and then the 4 warps are merged (through shared memory) by the same rule.
// One split: the block writes out directly. Several: it writes its normalised partial output o_s and
// lse_s = log2(sum of exp2) to the fp32 workspace, and attention_decode_combine_kernel merges the splits.
//
// Numerics: everything in fp32. Scores are computed as (q * scale * log2(e)) . k, so the softmax uses exp2; the
// log-sum-exp values in the workspace are in the same base-2 units. -inf handling: a masked key has score -inf;
// where a running max is still -inf (no visible key yet), it is replaced by 0 before exponentiating, so
// exp2(-inf - 0) = 0 and no (-inf) - (-inf) = NaN ever forms. A split (or a warp) without visible keys ends with
// l = 0 and writes o = 0, lse = -inf; the combine gives such splits weight exactly 0. seq_lens[b] == 0 (no visible
// key at all) gives an all-zero output row. seq_lens[b] > S (a caller error) is clamped to S, negative to 0:
// no out-of-bounds read, whatever the lengths.
//
// Limits: D in {16, 32, 64, 128} (128 is Mixtral's and the tuned case; D / 16 columns per lane), G in {1, 2, 4, 8},
// bf16/fp16, all tensors contiguous and 16-byte aligned, B <= 65535, S * Hkv * D < 2^31 (32-bit offsets within a
// sequence), at most kMaxSplits splits.
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "attention_decode.h"
#include "device.cuh"
#include "arch/sm80.cuh"

namespace mixtral {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kKeysPerHalf = 4;                       // keys per half-warp per tile
constexpr int kTileKeys = kWarps * 2 * kKeysPerHalf;  // 32 keys per tile
constexpr int kStages = 3;
constexpr int kMaxSplits = 64;
constexpr int kMinKeysPerSplit = 128;  // below this a split's fixed costs (q load, pipeline fill, merge) dominate
constexpr int kCombineThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

// Where each (key kk, head g) score sits after the half-warp reduction. Index idx = kk * G + g, N = 4G of them.
// N >= 16: lane l16 holds indices l16 * R + i in slots i < R = N / 16. N < 16: lane l16 holds index l16 >> SHIFT
// (2^SHIFT lanes hold the same value). In every case the key of a lane's slots is kk = l16 >> 2.
template <int G>
struct ScoreLayout {
  static constexpr int N = kKeysPerHalf * G;
  static constexpr int R = N >= 16 ? N / 16 : 1;
  static constexpr int SHIFT = N >= 16 ? 0 : (N == 8 ? 1 : 2);
  static constexpr __host__ __device__ int owner(int idx) { return N >= 16 ? idx / R : idx << SHIFT; }
  static constexpr __host__ __device__ int slot(int idx) { return N >= 16 ? idx % R : 0; }
};

// Sums N values per lane over the 16 lanes of each half-warp. Each xor step with CUR > 1 values left sends the
// half this lane does not keep and adds the partner's copy of the half it keeps (upper lanes keep the upper half),
// so the index bits are peeled off against lane bits 3, 2, 1, 0; once one value is left the remaining steps are a
// plain butterfly. Result layout: ScoreLayout.
template <int N, int CUR, int OFF>
__device__ __forceinline__ void half_warp_transpose_sum(float (&v)[N], int lane) {
  if constexpr (OFF > 0) {
    if constexpr (CUR > 1) {
      constexpr int H = CUR / 2;
      const bool upper = (lane & OFF) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = upper ? v[i] : v[i + H];
        const float keep = upper ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
      }
      half_warp_transpose_sum<N, H, OFF / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], OFF);
      half_warp_transpose_sum<N, 1, OFF / 2>(v, lane);
    }
  }
}

// N consecutive elements (N * sizeof(T) in {2, 4, 8, 16} bytes, aligned to that) as ONE load, then to fp32. Copying a
// struct of N bf16 instead lets the compiler split it into N 2-byte loads.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* src, float (&f)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  static_assert(kBytes == 2 || kBytes == 4 || kBytes == 8 || kBytes == 16, "load width");
  using Word = std::conditional_t<kBytes == 16, uint4,
               std::conditional_t<kBytes == 8, uint2, std::conditional_t<kBytes == 4, unsigned, unsigned short>>>;
  const Word w = *reinterpret_cast<const Word*>(src);
  T t[N];
  memcpy(t, &w, kBytes);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] = to_float(t[i]);
}

// A running max that is still -inf (no visible key yet) is used as 0 when subtracted (see the header).
__device__ __forceinline__ float finite_or_zero(float m) { return m == -INFINITY ? 0.f : m; }

template <typename T, int D>
constexpr size_t pipeline_smem_bytes() {
  return static_cast<size_t>(kStages) * 2 * kTileKeys * D * sizeof(T);
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads) attention_decode_kernel(AttentionDecodeParams p) {
  static_assert(D == 16 || D == 32 || D == 64 || D == 128, "attention_decode: head_dim must be 16, 32, 64 or 128");
  static_assert(G == 1 || G == 2 || G == 4 || G == 8, "attention_decode: Hq / Hkv must be 1, 2, 4 or 8");
  constexpr int EPL = D / 16;                                // columns per lane (16 lanes per row)
  constexpr int CPR = D * static_cast<int>(sizeof(T)) / 16;  // 16-byte pieces per row
  constexpr int TILE = kTileKeys * D;                        // elements of one K (or V) tile
  static_assert(kWarps * G * (D + 2) * sizeof(float) <= pipeline_smem_bytes<T, D>(), "merge buffer must fit");
  using L = ScoreLayout<G>;

  MX_DYNAMIC_SHARED(unsigned char, smem_raw, 16);
  T* smem = reinterpret_cast<T*>(smem_raw);  // [kStages][K, V][kTileKeys][D]

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, l16 = lane & 15, hw = lane >> 4;

  // This split's keys [lo, hi); see the header for the rule.
  int64_t len64 = p.seq_lens[b];
  len64 = len64 < 0 ? 0 : (len64 > p.cache_len ? p.cache_len : len64);
  const int vis_hi = static_cast<int>(len64);
  const int vis_lo = p.window > 0 ? max(0, vis_hi - p.window) : 0;
  const int per_split = ((vis_hi - vis_lo + p.num_splits - 1) / p.num_splits + kTileKeys - 1) / kTileKeys * kTileKeys;
  const int lo = vis_lo + split * per_split;
  const int hi = min(lo + per_split, vis_hi);
  const int ntiles = hi > lo ? (hi - lo + kTileKeys - 1) / kTileKeys : 0;

  // Offsets within one sequence's cache rows fit in 32 bits (the binding checks S * Hkv * D < 2^31).
  const int key_stride = p.kv_heads * D;  // elements between consecutive slots
  const int64_t head_base = (static_cast<int64_t>(b) * p.cache_len * p.kv_heads + h) * D;
  const T* kg = static_cast<const T*>(p.k_cache) + head_base;
  const T* vg = static_cast<const T*>(p.v_cache) + head_base;

  // Tile copy: thread tid always copies column piece tid % CPR of keys tid / CPR + i * KEYS_PER_PASS, so only the
  // tile's first key moves. Keys past the split end copy nothing (zero-fill) and point at slot 0, a valid address.
  constexpr int KEYS_PER_PASS = kThreads / CPR;
  constexpr int PASSES = KEYS_PER_PASS >= kTileKeys ? 1 : kTileKeys / KEYS_PER_PASS;
  static_assert(kThreads % CPR == 0 && (KEYS_PER_PASS >= kTileKeys || kTileKeys % KEYS_PER_PASS == 0), "tile copy");
  const int my_key = tid / CPR;
  const int my_col = (tid % CPR) * (16 / static_cast<int>(sizeof(T)));
  auto load_tile = [&](int tile, int stage) {
    const int first = lo + tile * kTileKeys + my_key;
    T* dst = smem + stage * (2 * TILE) + my_key * D + my_col;
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      if (KEYS_PER_PASS > kTileKeys && my_key >= kTileKeys) break;  // small D: more threads than pieces
      const int key = first + i * KEYS_PER_PASS;
      const bool ok = key < hi;
      const int off = (ok ? key : 0) * key_stride + my_col;
      // 16-byte copies; past the split end nothing is read and the 16 bytes are zero-filled.
      cp_async_cg_16(smem_u32(dst + i * KEYS_PER_PASS * D), kg + off, ok ? 16 : 0);
      cp_async_cg_16(smem_u32(dst + TILE + i * KEYS_PER_PASS * D), vg + off, ok ? 16 : 0);
    }
  };

  // q of the G heads, this lane's columns, pre-scaled so that scores are in log2 units.
  float qv[G][EPL];
  {
    const float qscale = p.scale * kLog2e;
    const T* qp = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.q_heads + h * G) * D + l16 * EPL;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      load_floats(qp + g * D, qv[g]);
#pragma unroll
      for (int e = 0; e < EPL; ++e) qv[g][e] *= qscale;
    }
  }

  float acc[G][EPL];
  float m_run[G], l_run[G];  // per head; m_run is warp-uniform, l_run covers this half-warp's keys
  float m_own[L::R];         // m_run of the heads of this lane's score slots (same values, slot-indexed)
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m_run[g] = -INFINITY;
    l_run[g] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < L::R; ++i) m_own[i] = -INFINITY;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) load_tile(s, s);
    cp_async_commit_group();  // committed even when empty so that group counting is the same for every thread
  }

  const int key0 = warp * 2 * kKeysPerHalf + hw * kKeysPerHalf;  // this half-warp's first key in a tile
  int read_stage = 0, write_stage = kStages - 1;
  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait_group<kStages - 2>();  // this thread's pieces of tile t have landed
    __syncthreads();               // everyone's have; and everyone finished tile t - 1, whose stage is reused now
    if (t + kStages - 1 < ntiles) load_tile(t + kStages - 1, write_stage);
    cp_async_commit_group();
    write_stage = write_stage + 1 == kStages ? 0 : write_stage + 1;

    const T* sk = smem + read_stage * (2 * TILE);
    const T* sv = sk + TILE;
    read_stage = read_stage + 1 == kStages ? 0 : read_stage + 1;

    float s[L::N];
#pragma unroll
    for (int kk = 0; kk < kKeysPerHalf; ++kk) {
      float kf[EPL];
      load_floats(sk + (key0 + kk) * D + l16 * EPL, kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float a = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) a = fmaf(qv[g][e], kf[e], a);
        s[kk * G + g] = a;
      }
    }
    half_warp_transpose_sum<L::N, L::N, 8>(s, lane);

    // Mask keys past the split end (the last tile may overhang it), then the tile max of each head over the
    // warp's 8 keys: the key of a slot is lane bits 2-3 plus the half (bit 4).
    const bool key_ok = lo + t * kTileKeys + key0 + (l16 >> 2) < hi;
    float tmax[L::R], pown[L::R];
#pragma unroll
    for (int i = 0; i < L::R; ++i) {
      if (!key_ok) s[i] = -INFINITY;
      float mx = s[i];
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      tmax[i] = mx;
      m_own[i] = fmaxf(m_own[i], mx);
      pown[i] = exp2f(s[i] - finite_or_zero(m_own[i]));
    }
    // New running max of every head; m_run is warp-uniform, so is the branch: the rescale (alpha = 1 otherwise) is
    // skipped on the tiles that raise no head's max, most of them once the max has settled.
    float m_new[G];
    bool grew = false;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float tm = __shfl_sync(0xffffffffu, tmax[L::slot(g)], L::owner(g));  // key 0's lane holds head g
      m_new[g] = fmaxf(m_run[g], tm);
      grew |= m_new[g] != m_run[g];
    }
    if (grew) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float alpha = exp2f(m_run[g] - finite_or_zero(m_new[g]));
        m_run[g] = m_new[g];
        l_run[g] *= alpha;
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[g][e] *= alpha;
      }
    }

#pragma unroll
    for (int kk = 0; kk < kKeysPerHalf; ++kk) {
      float vf[EPL];
      load_floats(sv + (key0 + kk) * D + l16 * EPL, vf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float pv = __shfl_sync(0xffffffffu, pown[L::slot(kk * G + g)], L::owner(kk * G + g), 16);
        l_run[g] += pv;
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[g][e] = fmaf(pv, vf[e], acc[g][e]);
      }
    }
  }
  cp_async_wait_group<0>();  // only empty groups can be pending here; drained before shared memory is reused
  __syncthreads();

  // The two half-warps share m_run, so their sums add directly.
#pragma unroll
  for (int g = 0; g < G; ++g) {
    l_run[g] += __shfl_xor_sync(0xffffffffu, l_run[g], 16);
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], 16);
  }
  float* sm_acc = reinterpret_cast<float*>(smem_raw);  // [kWarps][G][D]
  float* sm_m = sm_acc + kWarps * G * D;               // [kWarps][G]
  float* sm_l = sm_m + kWarps * G;                     // [kWarps][G]
  if (hw == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < EPL; ++e) sm_acc[(warp * G + g) * D + l16 * EPL + e] = acc[g][e];
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      sm_m[warp * G + g] = m_run[g];
      sm_l[warp * G + g] = l_run[g];
    }
  }
  __syncthreads();

  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_heads;
  for (int idx = tid; idx < G * D; idx += kThreads) {
    const int g = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w * G + g]);
    const float mu = finite_or_zero(mx);
    float num = 0.f, den = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float c = exp2f(sm_m[w * G + g] - mu);
      num = fmaf(c, sm_acc[(w * G + g) * D + d], num);
      den = fmaf(c, sm_l[w * G + g], den);
    }
    const float o = den > 0.f ? num / den : 0.f;
    const int64_t row = static_cast<int64_t>(b) * p.q_heads + h * G + g;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[row * D + d] = from_float<T>(o);
    } else {
      p.ws_out[(split * rows + row) * D + d] = o;
      if (d == 0) p.ws_lse[split * rows + row] = den > 0.f ? mx + log2f(den) : -INFINITY;
    }
  }
}

// Merges the splits of one (sequence, query head) row: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),
// M = max_s lse_s. Empty splits have lse_s = -inf and weight 0; a row whose splits are all empty gets zeros.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) attention_decode_combine_kernel(AttentionDecodeParams p) {
  MX_SHARED(float[kMaxSplits], weight);
  MX_SHARED(float, inv_total);
  const int64_t row = blockIdx.x;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_heads;
  const int n = p.num_splits;
  if (threadIdx.x < 32) {
    float mx = -INFINITY;
    for (int s = threadIdx.x; s < n; s += 32) mx = fmaxf(mx, p.ws_lse[s * rows + row]);
    mx = warp_max(mx);
    const float mu = finite_or_zero(mx);
    float total = 0.f;
    for (int s = threadIdx.x; s < n; s += 32) {
      const float w = exp2f(p.ws_lse[s * rows + row] - mu);
      weight[s] = w;
      total += w;
    }
    total = warp_sum(total);
    if (threadIdx.x == 0) inv_total = total > 0.f ? 1.f / total : 0.f;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < p.head_dim; d += kCombineThreads) {
    float num = 0.f;
    for (int s = 0; s < n; ++s) num = fmaf(weight[s], p.ws_out[(s * rows + row) * p.head_dim + d], num);
    static_cast<T*>(p.out)[row * p.head_dim + d] = from_float<T>(num * inv_total);
  }
}

using KernelFn = void (*)(AttentionDecodeParams);

struct Variant {
  KernelFn fn = nullptr;
  KernelFn combine = nullptr;
  size_t smem = 0;
  int index = -1;  // 0 .. kVariants-1, for the occupancy cache
};
constexpr int kVariants = 2 * 4 * 4;  // dtype x D x G

template <typename T, int D, int G>
Variant make_variant(int index) {
  return Variant{attention_decode_kernel<T, D, G>, attention_decode_combine_kernel<T>, pipeline_smem_bytes<T, D>(),
                 index};
}

template <typename T, int D>
Variant pick_group(int group, int base) {
  switch (group) {
    case 1: return make_variant<T, D, 1>(base);
    case 2: return make_variant<T, D, 2>(base + 1);
    case 4: return make_variant<T, D, 4>(base + 2);
    case 8: return make_variant<T, D, 8>(base + 3);
  }
  return Variant{};
}

// The one switch over the compile-time specialisations (head_dim x group size).
template <typename T>
Variant pick_typed(int head_dim, int group, int base) {
  switch (head_dim) {
    case 128: return pick_group<T, 128>(group, base);
    case 64: return pick_group<T, 64>(group, base + 4);
    case 32: return pick_group<T, 32>(group, base + 8);
    case 16: return pick_group<T, 16>(group, base + 12);
  }
  return Variant{};
}

Variant pick(int head_dim, int q_heads, int kv_heads, DType dtype) {
  if (kv_heads <= 0 || q_heads <= 0 || q_heads % kv_heads != 0) return Variant{};
  const int group = q_heads / kv_heads;
  switch (dtype) {
    case DType::kBFloat16: return pick_typed<__nv_bfloat16>(head_dim, group, 0);
    case DType::kFloat16: return pick_typed<__half>(head_dim, group, kVariants / 2);
    default: return Variant{};
  }
}

// Resident blocks per SM of a variant on the current device (cached: the answer depends only on the device).
int blocks_per_sm(const Variant& v) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices][kVariants];  // zero-initialised (static storage)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) device = -1;
  if (device >= 0) {
    const int cached = cache[device][v.index].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, v.fn, kThreads, v.smem) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();  // a failed query must not surface as the next launch's error
    return 1;
  }
  if (device >= 0) cache[device][v.index].store(n, std::memory_order_relaxed);
  return n;
}

}  // namespace

bool attention_decode_supported(int head_dim, int q_heads, int kv_heads, DType dtype) {
  return pick(head_dim, q_heads, kv_heads, dtype).fn != nullptr;
}

// Blocks of one launch all do the same amount of work (for equal lengths), so the time is set by the number of
// waves: pick the split count whose block count fills the resident slots (SMs x blocks per SM) best, the smallest
// such count on (near) ties, each split keeping at least kMinKeysPerSplit of the `span` slots a query can see.
int attention_decode_num_splits(int batch, int q_heads, int kv_heads, int head_dim, int64_t span, DType dtype,
                                int sm_count) {
  const Variant v = pick(head_dim, q_heads, kv_heads, dtype);
  if (v.fn == nullptr || batch <= 0 || span <= 0) return 1;
  const int64_t capacity = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * blocks_per_sm(v);
  const int64_t units = static_cast<int64_t>(batch) * kv_heads;
  const int64_t by_len = span / kMinKeysPerSplit;
  const int most = static_cast<int>(by_len < 1 ? 1 : (by_len < kMaxSplits ? by_len : kMaxSplits));
  int best = 1;
  double best_fill = 0.0;
  for (int s = 1; s <= most; ++s) {
    const int64_t blocks = units * s;
    const int64_t waves = (blocks + capacity - 1) / capacity;
    const double fill = static_cast<double>(blocks) / static_cast<double>(waves * capacity);
    if (fill > best_fill * 1.01) {
      best = s;
      best_fill = fill;
    }
  }
  return best;
}

cudaError_t attention_decode_launch(const AttentionDecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.q_heads == 0) return cudaSuccess;
  const Variant v = pick(p.head_dim, p.q_heads, p.kv_heads, p.dtype);
  if (v.fn == nullptr) return cudaErrorNotSupported;
  if (p.num_splits < 1 || p.num_splits > kMaxSplits || p.cache_len <= 0 ||
      p.cache_len * p.kv_heads * p.head_dim > 0x7fffffff ||
      p.window < 0 || (p.num_splits > 1 && (p.ws_out == nullptr || p.ws_lse == nullptr)))
    return cudaErrorInvalidValue;
  if ((reinterpret_cast<uintptr_t>(p.q) | reinterpret_cast<uintptr_t>(p.k_cache) |
       reinterpret_cast<uintptr_t>(p.v_cache)) % 16 != 0)
    return cudaErrorMisalignedAddress;
  if (p.batch > 65535 || p.kv_heads > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.kv_heads),
                  static_cast<unsigned>(p.batch));
  mixtral::launch(v.fn, grid, kThreads, v.smem, stream, p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_heads;
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  mixtral::launch(v.combine, static_cast<unsigned>(rows), kCombineThreads, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace mixtral
