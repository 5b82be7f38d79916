// attention_prefill: causal GQA flash attention of a packed variable-length batch against the KV cache.
// See attention_prefill.cu (the sm_80 mma.sync path, runs on sm_80 and later) and attention_prefill_sm90.cu (the
// Hopper wgmma path). The launcher picks the path; the binding (ops.cpp) chooses which one to ask for.
#pragma once
#include "common.h"

namespace mixtral {

enum class AttnPath : int { kSm80 = 0, kSm90 = 1 };

struct AttentionPrefillParams {
  const void* q;            // [T, Hq, D], token stride q_stride_t, head stride q_stride_h (elements), D contiguous
  const void* k_cache;      // [B, S, Hkv, D], strides k_stride_b / k_stride_s / k_stride_h, D contiguous
  const void* v_cache;      // [B, S, Hkv, D], strides v_stride_b / v_stride_s / v_stride_h, D contiguous
  const int* cu_seqlens_q;  // [B + 1] int32: sequence b owns q rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1
  const int* seq_lens_k;    // [B] int32: valid cache slots of sequence b (cached prefix + its new tokens)
  void* out;                // [T, Hq, D] contiguous
  int64_t q_stride_t, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int batch;                // B
  int cache_len;            // S (seq_lens_k is clamped to it: a bad length cannot read past the cache)
  int q_heads;              // Hq
  int kv_heads;             // Hkv (Hq % Hkv == 0; G = Hq / Hkv must divide the kernels' 128-row tile)
  int head_dim;             // D (only 128 is implemented)
  int max_seqlen_q;         // bound on the new tokens per sequence; sizes the grid
  float scale;              // softmax scale (usually 1/sqrt(D))
  int window;               // 0: none; else key j is visible to position p iff p - W < j <= p
  DType dtype;              // q, k_cache, v_cache and out share it: kBFloat16 or kFloat16
};

// The query rows (token, head) one thread block covers: the G heads of one KV head for 128 / G tokens.
constexpr int kAttnPrefillRowsPerBlock = 128;
// The one head_dim both paths implement.
constexpr int kAttnPrefillHeadDim = 128;

// Whether both paths implement this shape / dtype: D = kAttnPrefillHeadDim, Hq a multiple of Hkv whose group size
// G = Hq / Hkv divides kAttnPrefillRowsPerBlock (a block holds whole groups), bf16 or fp16. The binding's checks and
// mixtral_ext/ops.py (which sends other shapes to the reference) both ask this.
inline bool attention_prefill_supported(int64_t head_dim, int64_t q_heads, int64_t kv_heads, DType dtype) {
  return head_dim == kAttnPrefillHeadDim && kv_heads > 0 && q_heads > 0 && q_heads % kv_heads == 0 &&
         kAttnPrefillRowsPerBlock % (q_heads / kv_heads) == 0 &&
         (dtype == DType::kBFloat16 || dtype == DType::kFloat16);
}

// Whether this build holds the sm_90a kernel (false when the sm_90a pass was not compiled).
bool attention_prefill_sm90_available();

// Launches the chosen path. kSm90 needs a compute-capability 9.0 device and attention_prefill_sm90_available().
cudaError_t attention_prefill_launch(const AttentionPrefillParams& p, AttnPath path, cudaStream_t stream);

// Each path's own launcher (attention_prefill.cu and attention_prefill_sm90.cu).
cudaError_t attention_prefill_sm80_launch(const AttentionPrefillParams& p, cudaStream_t stream);
cudaError_t attention_prefill_sm90_launch(const AttentionPrefillParams& p, cudaStream_t stream);

}  // namespace mixtral
