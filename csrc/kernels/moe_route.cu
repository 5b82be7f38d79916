// moe_route: softmax + top-k + renormalise + per-expert counts/offsets + expert-sorted permutation, fused.
//
// Top-k (one thread per token): the E logits of the row are read once, converted to fp32 and inserted into a
// sorted list of k (value, id) pairs held in registers (k is a template parameter). Insertion uses a strict
// comparison (ranks_above) and experts arrive in ascending index order, so among equal fp32 logits the lower
// expert index ranks first (the tie rule; the reference gets the same from a stable descending sort). Weights:
// the renormalised top-k of the full softmax equal the softmax over the k chosen logits,
// w_j = exp(l_j - l_0) / sum_i exp(l_i - l_0) in fp32, with l_0 the largest (so every exponent is <= 0: no
// overflow; outliers of +-30 stay finite).
//
// Permutation: row of (token t, slot j) choosing expert e = offsets[e] + #{tokens t' < t that chose e} (a token
// chooses an expert at most once, so no tie between slots). Tokens are processed in tiles of blockDim tokens in
// ascending order; inside a tile, each warp ranks its lanes with one __ballot_sync per expert (rank = popcount of
// the lower lanes that chose the same expert), a per-tile exclusive prefix over warps (warp order; a shuffle scan,
// one warp per expert) gives the tile's offsets, and a running per-expert base carries from tile to tile.
// Everything is integer arithmetic in a fixed order: the output bits never depend on scheduling. Counting uses
// integer shared-memory atomics of per-warp ballot counts: integer sums are order-independent (deterministic).
//
// Launches: T <= kSingleBlockMaxTokens: one block of up to 1024 threads does pass 1 (top-k, counts), the scan of
// the E counts, and pass 2 (ranks, scatter): one launch. Larger T: three launches - count (one block per
// kChunkTokens tokens; top-k, writes per-block counts to the workspace), scan (one block: per-expert exclusive
// prefix over blocks plus the expert offsets, in place in the workspace), scatter (per block: pass 2 from its
// base). Limits: E <= 64 (per-expert shared tables), k <= 4, T * k < 2^31. NaN logits rank above every number
// (NaNs among themselves by index), as torch.sort / torch.topk order them, so the ids match the reference's (its
// weights for such a row are NaN, as the kernel's are); the k ids are always distinct and valid.
#include "device.cuh"
#include "moe_route.h"

namespace mixtral {
namespace {

constexpr int kMaxE = kMoeRouteMaxExperts;
constexpr int kMaxWarps = 32;
constexpr int kSingleBlockThreads = 1024;
// One block handles up to this many tokens in one launch; above it the three-launch path spreads the work. The
// crossover (one block looping over 4+ tiles vs three short launches) is a guess: measure it on the GPU.
constexpr int64_t kSingleBlockMaxTokens = 4096;
constexpr int kMultiThreads = 256;
constexpr int kChunkTokens = 1024;  // tokens per block on the multi-block path (4 tiles of 256)
static_assert(kChunkTokens % kMultiThreads == 0, "a block's chunk must be whole tiles");
static_assert(kSingleBlockThreads / 32 <= kMaxWarps && kMultiThreads / 32 <= kMaxWarps, "per-warp table size");

// Whether logit a ranks strictly above b: '>' on numbers, NaN above every number (torch's sort order); never for
// equal values or two NaNs, which keeps the earlier (lower-index) expert first.
__device__ __forceinline__ bool ranks_above(float a, float b) { return a > b || (a != a && b == b); }

// The k largest logits of one row, best first, ties toward the lower expert index, and their renormalised weights.
template <typename T, int K>
__device__ __forceinline__ void route_token(const T* __restrict__ row, int E, float (&w)[K], int (&id)[K]) {
  float val[K];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    val[j] = -INFINITY;
    id[j] = -1;  // empty slot: filled by the first k experts whatever their value (even -inf)
  }
#pragma unroll 4
  for (int e = 0; e < E; ++e) {
    const float v = to_float(row[e]);
    if (id[K - 1] < 0 || ranks_above(v, val[K - 1])) {
      val[K - 1] = v;
      id[K - 1] = e;
      // Bubble up with a strict comparison: an equal earlier (lower-index) expert keeps its place.
#pragma unroll
      for (int j = K - 1; j > 0; --j) {
        if (id[j - 1] < 0 || ranks_above(val[j], val[j - 1])) {
          const float tv = val[j]; val[j] = val[j - 1]; val[j - 1] = tv;
          const int ti = id[j]; id[j] = id[j - 1]; id[j - 1] = ti;
        }
      }
    }
  }
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    w[j] = expf(val[j] - val[0]);  // <= 1; the best is exactly 1
    sum += w[j];
  }
  const float inv = 1.f / sum;
#pragma unroll
  for (int j = 0; j < K; ++j) w[j] *= inv;
}

// Adds this warp's per-expert counts of the (token, slot) pairs to s_count (shared, [E]).
template <int K>
__device__ __forceinline__ void warp_count(const int (&id)[K], bool valid, int E, int* s_count) {
  const int lane = threadIdx.x & 31;
  for (int e = 0; e < E; ++e) {
    bool has = false;
#pragma unroll
    for (int j = 0; j < K; ++j) has |= valid && id[j] == e;
    const unsigned b = __ballot_sync(0xffffffffu, has);
    if (lane == 0 && b != 0u) atomicAdd(&s_count[e], __popc(b));
  }
}

// Pass 2 for one tile of blockDim.x tokens (token t for this thread, its ids in id[], -1 where !valid): ranks, then
// sorted_tokens and token_rows. s_base[e] holds the first row of expert e still free for this block's tokens and
// advances by the tile's count. Every thread of the block must call this (it synchronises).
template <int K>
__device__ __forceinline__ void scatter_tile(const MoeRouteParams& p, int64_t t, bool valid, const int (&id)[K],
                                             int* s_base, int* s_warp) {
  const int E = p.experts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const unsigned lower = (1u << lane) - 1u;  // lanes below this one
  int rank[K];
#pragma unroll
  for (int j = 0; j < K; ++j) rank[j] = 0;
  // Rank inside the warp and the warp's count, per expert.
  for (int e = 0; e < E; ++e) {
    bool has = false;
#pragma unroll
    for (int j = 0; j < K; ++j) has |= id[j] == e;
    const unsigned b = __ballot_sync(0xffffffffu, has);
#pragma unroll
    for (int j = 0; j < K; ++j)
      if (id[j] == e) rank[j] = __popc(b & lower);
    if (lane == 0) s_warp[warp * kMaxE + e] = __popc(b);
  }
  __syncthreads();
  // Per expert: exclusive prefix over the tile's warps (warp order), starting at the expert's running base, which
  // then advances by the tile's count. Few warps: one thread per expert walks them; many: one warp per expert,
  // lane w = warp w, shuffle scan.
  if (nwarps <= 4) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      int run = s_base[e];
      for (int w = 0; w < nwarps; ++w) {
        const int c = s_warp[w * kMaxE + e];
        s_warp[w * kMaxE + e] = run;
        run += c;
      }
      s_base[e] = run;
    }
  } else {
    for (int e = warp; e < E; e += nwarps) {
      const int base = s_base[e];  // read by every lane before the shuffles; lane 31 rewrites it after them
      const int c = lane < nwarps ? s_warp[lane * kMaxE + e] : 0;
      int incl = c;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      if (lane < nwarps) s_warp[lane * kMaxE + e] = base + incl - c;
      // Shuffles do not order shared-memory accesses: the barrier makes every lane's read of s_base[e] happen
      // before lane 31 rewrites it (a write-after-read race under the CUDA memory model otherwise).
      __syncwarp();
      if (lane == 31) s_base[e] = base + incl;  // lanes >= nwarps add 0: lane 31 holds the tile total
    }
  }
  __syncthreads();
  if (valid) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int row = s_warp[warp * kMaxE + id[j]] + rank[j];
      p.sorted_tokens[row] = static_cast<int>(t);
      p.token_rows[t * K + j] = row;
    }
  }
  __syncthreads();  // s_warp is rewritten by the next tile
}

// Pass 2 over tokens [t_begin, t_end) in tiles of blockDim.x; each thread re-reads the ids of its own tokens (written
// by this thread in pass 1 on the single-block path, by the count kernel on the multi-block path).
template <int K>
__device__ void scatter_tiles(const MoeRouteParams& p, int64_t t_begin, int64_t t_end, int* s_base, int* s_warp) {
  for (int64_t t0 = t_begin; t0 < t_end; t0 += blockDim.x) {
    const int64_t t = t0 + threadIdx.x;
    const bool valid = t < t_end;
    int id[K];
#pragma unroll
    for (int j = 0; j < K; ++j) id[j] = valid ? p.topk_ids[t * K + j] : -1;
    scatter_tile<K>(p, t, valid, id, s_base, s_warp);
  }
}

// Pass 1 over tokens [t_begin, t_end) (tiles of blockDim.x): top-k, weights and ids written, counts into s_count.
template <typename T, int K>
__device__ void topk_tiles(const MoeRouteParams& p, int64_t t_begin, int64_t t_end, int* s_count) {
  const T* logits = static_cast<const T*>(p.logits);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += blockDim.x) {
    const int64_t t = t0 + threadIdx.x;
    const bool valid = t < t_end;
    float w[K];
    int id[K];
    if (valid) {
      route_token<T, K>(logits + t * p.logits_stride, p.experts, w, id);
#pragma unroll
      for (int j = 0; j < K; ++j) {
        p.topk_weights[t * K + j] = w[j];
        p.topk_ids[t * K + j] = id[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < K; ++j) id[j] = -1;
    }
    warp_count<K>(id, valid, p.experts, s_count);
  }
}

// Exclusive scan of s_count[0..E) by warp 0: writes expert_counts and expert_offsets, and s_base = the offsets.
__device__ __forceinline__ void scan_counts_warp0(const MoeRouteParams& p, const int* s_count, int* s_base) {
  const int lane = threadIdx.x;
  const int E = p.experts;
  const int c0 = lane < E ? s_count[lane] : 0;
  const int c1 = lane + 32 < E ? s_count[lane + 32] : 0;
  int i0 = c0, i1 = c1;  // inclusive scans of the two halves
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int a = __shfl_up_sync(0xffffffffu, i0, o);
    const int b = __shfl_up_sync(0xffffffffu, i1, o);
    if (lane >= o) {
      i0 += a;
      i1 += b;
    }
  }
  const int total0 = __shfl_sync(0xffffffffu, i0, 31);
  i1 += total0;
  if (lane < E) {
    p.expert_counts[lane] = c0;
    p.expert_offsets[lane] = i0 - c0;
    s_base[lane] = i0 - c0;
  }
  if (lane + 32 < E) {
    p.expert_counts[lane + 32] = c1;
    p.expert_offsets[lane + 32] = i1 - c1;
    s_base[lane + 32] = i1 - c1;
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(kSingleBlockThreads) moe_route_single_kernel(MoeRouteParams p) {
  MX_SHARED(int[kMaxE], s_count);
  MX_SHARED(int[kMaxE], s_base);
  MX_SHARED(int[kMaxWarps * kMaxE], s_warp);
  for (int e = threadIdx.x; e < kMaxE; e += blockDim.x) s_count[e] = 0;
  __syncthreads();
  // One tile (T <= blockDim, every decode step): the ids stay in registers between the passes.
  const bool one_tile = p.tokens <= blockDim.x;
  int id[K];
  const bool valid = threadIdx.x < p.tokens;
  if (one_tile) {
    float w[K];
    if (valid) {
      route_token<T, K>(static_cast<const T*>(p.logits) + threadIdx.x * p.logits_stride, p.experts, w, id);
#pragma unroll
      for (int j = 0; j < K; ++j) {
        p.topk_weights[threadIdx.x * K + j] = w[j];
        p.topk_ids[threadIdx.x * K + j] = id[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < K; ++j) id[j] = -1;
    }
    warp_count<K>(id, valid, p.experts, s_count);
  } else {
    topk_tiles<T, K>(p, 0, p.tokens, s_count);
  }
  __syncthreads();
  if (threadIdx.x < 32) scan_counts_warp0(p, s_count, s_base);
  if (threadIdx.x == 0) p.expert_offsets[p.experts] = static_cast<int>(p.tokens) * K;
  __syncthreads();
  if (one_tile)
    scatter_tile<K>(p, threadIdx.x, valid, id, s_base, s_warp);
  else
    scatter_tiles<K>(p, 0, p.tokens, s_base, s_warp);  // same tiling as pass 1: a thread re-reads its own ids
}

// Multi-block pass 1: block b handles tokens [b * kChunkTokens, ...) and writes its counts to workspace[b, E].
template <typename T, int K>
__global__ void __launch_bounds__(kMultiThreads) moe_route_count_kernel(MoeRouteParams p) {
  MX_SHARED(int[kMaxE], s_count);
  if (threadIdx.x < kMaxE) s_count[threadIdx.x] = 0;
  __syncthreads();
  const int64_t t_begin = static_cast<int64_t>(blockIdx.x) * kChunkTokens;
  const int64_t t_end = t_begin + kChunkTokens < p.tokens ? t_begin + kChunkTokens : p.tokens;
  topk_tiles<T, K>(p, t_begin, t_end, s_count);
  __syncthreads();
  if (threadIdx.x < p.experts) p.workspace[static_cast<int64_t>(blockIdx.x) * p.experts + threadIdx.x] =
      s_count[threadIdx.x];
}

// Multi-block scan (one block of kMaxE threads, thread e = expert e): totals per expert, the exclusive scan over
// experts (offsets), then each block's count replaced in place by that block's first row of the expert.
__global__ void __launch_bounds__(kMaxE) moe_route_scan_kernel(MoeRouteParams p, int nblocks) {
  MX_SHARED(int[kMaxE], s_count);
  MX_SHARED(int[kMaxE], s_base);
  const int e = threadIdx.x;
  const int E = p.experts;
  int total = 0;
  if (e < E)
    for (int b = 0; b < nblocks; ++b) total += p.workspace[static_cast<int64_t>(b) * E + e];
  s_count[e] = total;
  __syncthreads();
  if (threadIdx.x < 32) scan_counts_warp0(p, s_count, s_base);
  if (threadIdx.x == 0) p.expert_offsets[E] = static_cast<int>(p.tokens) * p.top_k;
  __syncthreads();
  if (e < E) {
    int run = s_base[e];
    for (int b = 0; b < nblocks; ++b) {
      int* slot = p.workspace + static_cast<int64_t>(b) * E + e;
      const int c = *slot;
      *slot = run;
      run += c;
    }
  }
}

template <int K>
__global__ void __launch_bounds__(kMultiThreads) moe_route_scatter_kernel(MoeRouteParams p) {
  MX_SHARED(int[kMaxE], s_base);
  MX_SHARED(int[kMaxWarps * kMaxE], s_warp);
  if (threadIdx.x < p.experts) s_base[threadIdx.x] = p.workspace[static_cast<int64_t>(blockIdx.x) * p.experts +
                                                                 threadIdx.x];
  __syncthreads();
  const int64_t t_begin = static_cast<int64_t>(blockIdx.x) * kChunkTokens;
  const int64_t t_end = t_begin + kChunkTokens < p.tokens ? t_begin + kChunkTokens : p.tokens;
  scatter_tiles<K>(p, t_begin, t_end, s_base, s_warp);
}

template <typename T, int K>
cudaError_t launch_typed(const MoeRouteParams& p, cudaStream_t stream) {
  if (p.tokens <= kSingleBlockMaxTokens) {
    // Whole warps only (the ballots need every lane); T = 0 still runs to write zero counts and offsets.
    int threads = static_cast<int>((p.tokens + 31) / 32 * 32);
    threads = threads < 32 ? 32 : (threads > kSingleBlockThreads ? kSingleBlockThreads : threads);
    mixtral::launch(moe_route_single_kernel<T, K>, 1, threads, 0, stream, p);
    return cudaGetLastError();
  }
  const int nblocks = static_cast<int>((p.tokens + kChunkTokens - 1) / kChunkTokens);
  mixtral::launch(moe_route_count_kernel<T, K>, nblocks, kMultiThreads, 0, stream, p);
  mixtral::launch(moe_route_scan_kernel, 1, kMaxE, 0, stream, p, nblocks);
  mixtral::launch(moe_route_scatter_kernel<K>, nblocks, kMultiThreads, 0, stream, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_k(const MoeRouteParams& p, cudaStream_t stream) {
  switch (p.top_k) {  // the supported k: static list, one instantiation each
    case 1: return launch_typed<T, 1>(p, stream);
    case 2: return launch_typed<T, 2>(p, stream);
    case 3: return launch_typed<T, 3>(p, stream);
    case 4: return launch_typed<T, 4>(p, stream);
  }
  return cudaErrorInvalidValue;
}
static_assert(kMoeRouteMaxTopK == 4, "launch_k instantiates k = 1..4");

}  // namespace

int64_t moe_route_workspace_ints(int64_t tokens, int experts) {
  if (tokens <= kSingleBlockMaxTokens) return 0;
  return (tokens + kChunkTokens - 1) / kChunkTokens * experts;
}

cudaError_t moe_route_launch(const MoeRouteParams& p, cudaStream_t stream) {
  if (p.experts < 1 || p.experts > kMoeRouteMaxExperts || p.top_k < 1 || p.top_k > kMoeRouteMaxTopK ||
      p.top_k > p.experts || p.tokens < 0 || p.tokens * p.top_k >= (int64_t{1} << 31))
    return cudaErrorInvalidValue;
  if (moe_route_workspace_ints(p.tokens, p.experts) > 0 && p.workspace == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return launch_k<typename decltype(t)::type>(p, stream); });
}

}  // namespace mixtral
