// Grouped (permuted) expert GEMMs for the prefill regime of moe_experts. See moe_gemm.cu.
#pragma once
#include "common.h"

namespace mixtral {

// Rows are the T*k (token, slot) pairs in expert-sorted order (moe_route's sorted_tokens / expert_offsets).
struct MoeGroupedGemmParams {
  const void* x;               // [T, H] bf16 (or fp16: see dtype), token order
  const int* sorted_tokens;    // [R = T*k] token of each expert-sorted row
  const int* expert_offsets;   // [E + 1] rows of expert e are expert_offsets[e] .. expert_offsets[e+1]-1
  const void* w13;             // [E, 2I, H], w1/w3 interleaved by row (2i: gate, 2i+1: up)
  const void* w2;              // [E, H, I]
  void* inter;                 // [R, I] workspace (x's dtype): silu(gate) * up
  float* out_rows;             // [R, H] fp32: w2[e] @ inter[r], not yet weighted (the combine does that); the sm90
                               // path also uses it as scratch for the expert-ordered copy of x before GEMM2 writes it
  int64_t tokens;              // T
  int top_k;                   // k
  int experts;                 // E
  int64_t hidden;              // H
  int64_t inter_size;          // I
  int sm_count;                // from the device, for the persistent tile scheduler
  int max_smem_per_block;      // opt-in shared memory limit of the device (bytes)
  int sm_major;                // compute capability: 9 selects the Hopper path when built for sm_90a
  DType dtype = DType::kBFloat16;  // of x, w13, w2, inter: bf16 or fp16 (float32: cudaErrorNotSupported)
};

// Both GEMMs (two launches; three on the Hopper path, which first gathers x into expert order, see moe_gemm.cu).
// Returns cudaErrorNotSupported for shapes/dtypes/devices it cannot handle (the caller then uses another path).
// MIXTRAL_EXT_MOE_PATH=auto|sm80|sm90|decode (read on every call; default auto) forces one code path for tests and
// benchmarks; decode makes this launcher decline, so the caller's decode kernels run (threshold measurements).
cudaError_t moe_grouped_gemm_launch(const MoeGroupedGemmParams& p, cudaStream_t stream);

}  // namespace mixtral
