// moe_route: fused softmax / top-k / renormalise and the expert-sorted permutation of the (token, slot) rows.
// See moe_route.cu for the algorithm, the tie rule and the launch structure.
#pragma once
#include "common.h"

namespace mixtral {

constexpr int kMoeRouteMaxExperts = 64;  // per-expert tables in shared memory are sized for 64
constexpr int kMoeRouteMaxTopK = 4;      // the k best are kept in registers (compile-time k in 1..4)

// Whether the kernels implement E experts, k per token, logits of this dtype (every DType): 1 <= E <=
// kMoeRouteMaxExperts, 1 <= k <= min(E, kMoeRouteMaxTopK). The binding's checks and mixtral_ext/ops.py ask this.
inline bool moe_route_supported(int64_t experts, int64_t top_k, DType dtype) {
  return experts >= 1 && experts <= kMoeRouteMaxExperts && top_k >= 1 && top_k <= kMoeRouteMaxTopK &&
         top_k <= experts && (dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16);
}

struct MoeRouteParams {
  const void* logits;      // [T, E], rows logits_stride elements apart, E contiguous; dtype below
  float* topk_weights;     // [T, k] softmax over the k chosen logits (== full softmax, top-k, renormalised)
  int* topk_ids;           // [T, k] best first; ties toward the lower expert index
  int* expert_counts;      // [E]
  int* expert_offsets;     // [E + 1] exclusive prefix sum of the counts
  int* sorted_tokens;      // [T * k] token of each expert-sorted row (tokens ascending within an expert)
  int* token_rows;         // [T, k] row of each (token, slot): inverse of sorted_tokens
  int* workspace;          // moe_route_workspace_ints(T, E) int32 scratch, or nullptr when that is 0
  int64_t tokens;          // T (T * k < 2^31)
  int64_t logits_stride;   // elements between rows of logits
  int experts;             // E in 1..kMoeRouteMaxExperts
  int top_k;               // k in 1..min(E, kMoeRouteMaxTopK)
  DType dtype;             // of logits
};

// Scratch the multi-block path needs (per-block expert counts); 0 where one block does everything.
int64_t moe_route_workspace_ints(int64_t tokens, int experts);

// One launch for T <= the single-block limit (see moe_route.cu), three (count, scan, scatter) above it.
cudaError_t moe_route_launch(const MoeRouteParams& p, cudaStream_t stream);

}  // namespace mixtral
