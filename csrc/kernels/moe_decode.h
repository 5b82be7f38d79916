// moe_experts, decode regime: the two expert GEMVs (weights streamed once per row chunk at memory bandwidth) and the
// deterministic weighted combine back to token order. See moe_decode.cu.
#pragma once
#include "common.h"

namespace mixtral {

// Above this many tokens moe_experts first tries the tensor-core grouped GEMM (moe_gemm.h); at or below it the
// GEMV kernels here run. 64 is a first guess: it must be measured on the GPU (bench/kbench/moe_decode.py against
// the grouped GEMM once that exists). The GEMVs stay correct for any T (they loop over row chunks of an expert).
constexpr int64_t kMoeDecodeMaxTokens = 64;

// How the expert weights are stored (mixtral_ext/quant.py): dense in the activation dtype; int8 with a float32 scale
// per output row; or int4, two a byte (input 2j in the low nibble of byte j, 4-bit two's complement), with a float32
// scale per output row and group of kInt4Group consecutive inputs. Quantized weights are dequantized in registers
// (w = q * scale in fp32, as the reference does) and accumulated in fp32.
enum class WeightFormat : int { kDense = 0, kInt8 = 1, kInt4 = 2 };
constexpr int64_t kInt4Group = 128;

// The most experts moe_experts takes (the decode GEMVs' limit; the grouped GEMM's is higher).
constexpr int64_t kMoeMaxExperts = 64;

// H and I must be multiples of this: whole 16-byte weight vectors (8 dense bf16/fp16 weights, 16 int8) and, for int4,
// whole kInt4Group scale groups.
constexpr int64_t moe_experts_width_multiple(WeightFormat wformat) {
  return wformat == WeightFormat::kInt8 ? 16 : (wformat == WeightFormat::kInt4 ? kInt4Group : 8);
}

// Whether moe_experts (kDense) / moe_experts_quant (kInt8, kInt4) implement E experts of [2I, H] / [H, I] weights
// for bf16 / fp16 activations: 1 <= E <= kMoeMaxExperts, H and I positive multiples of
// moe_experts_width_multiple(wformat). Both regimes: the grouped GEMM takes every shape the decode GEMVs take. The
// binding's checks and mixtral_ext/ops.py ask this.
inline bool moe_experts_supported(int64_t experts, int64_t hidden, int64_t inter_size, WeightFormat wformat,
                                  DType dtype) {
  const int64_t multiple = moe_experts_width_multiple(wformat);
  return experts >= 1 && experts <= kMoeMaxExperts && hidden > 0 && inter_size > 0 && hidden % multiple == 0 &&
         inter_size % multiple == 0 && (dtype == DType::kBFloat16 || dtype == DType::kFloat16);
}

// Rows are the R = T*k (token, slot) pairs in expert-sorted order (moe_route's sorted_tokens / expert_offsets).
struct MoeDecodeParams {
  const void* x;               // [T, H] token order
  const int* sorted_tokens;    // [R] token of each expert-sorted row
  const int* expert_offsets;   // [E + 1]
  const void* w13;             // [E, 2I, H] w1/w3 interleaved by row (2i: gate unit i, 2i+1: up unit i); int8
                               // [E, 2I, H] or packed int4 [E, 2I, H/2] bytes with a quantized format
  const void* w2;              // [E, H, I]; int8 [E, H, I] or packed int4 [E, H, I/2]
  WeightFormat wformat;        // kDense (the zero value) or a quantized format with the scales below
  const float* w13_scale;      // quantized only: [E, 2I] (int8) or [E, 2I, H/128] (int4)
  const float* w2_scale;       // quantized only: [E, H] (int8) or [E, H, I/128] (int4)
  void* inter;                 // [R, I] silu(gate) * up, rounded once to the activation dtype
  float* out_rows;             // [R, H] fp32 w2[e] @ inter[r] (unweighted)
  int64_t tokens;              // T
  int64_t hidden;              // H, a multiple of 8 (16-byte vectors); of 16 for int8, of 128 for int4
  int64_t inter_size;          // I, the same multiple as H
  int top_k;                   // k
  int experts;                 // E <= 64
  DType dtype;                 // of x and inter (and of w13, w2 when dense): bf16 or fp16
};

// GEMV1 (gate/up + silu*mul -> inter) then GEMV2 (down -> out_rows): two launches.
cudaError_t moe_decode_experts_launch(const MoeDecodeParams& p, cudaStream_t stream);

struct MoeCombineParams {
  const float* out_rows;       // [R, H] fp32, expert-sorted rows
  const float* topk_weights;   // [T, k]
  const int* token_rows;       // [T, k] row of each (token, slot)
  void* y;                     // [T, H] activation dtype
  int64_t tokens;              // T
  int64_t hidden;              // H, a multiple of 8
  int top_k;                   // k
  DType dtype;                 // of y: bf16 or fp16
};

// y[t] = round(sum over slots s in order of topk_weights[t, s] * out_rows[token_rows[t, s]]): one launch, no atomics.
cudaError_t moe_combine_launch(const MoeCombineParams& p, cudaStream_t stream);

// Quantized expert weights expanded to the activation dtype, for the prefill path (the grouped GEMM reads dense
// tiles): out[r, j] = round(q[r, j] * scale) with the row's (int8) or the row-and-group's (int4) scale - the
// reference's dequantize, rounded once to dtype.
struct MoeDequantParams {
  const void* q;               // [rows, K] int8 or [rows, K/2] packed int4 (rows = E * N of a [E, N, K] matrix)
  const float* scale;          // [rows] (int8) or [rows, K/128] (int4)
  void* out;                   // [rows, K] in dtype
  int64_t rows;
  int64_t k;                   // K: a multiple of 16 (int8) or 128 (int4)
  WeightFormat wformat;        // kInt8 or kInt4
  DType dtype;                 // of out: bf16 or fp16
};

cudaError_t moe_dequantize_launch(const MoeDequantParams& p, cudaStream_t stream);

}  // namespace mixtral
