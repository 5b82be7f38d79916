// rope_kv_append: rotary embedding on q and k of the fused qkv projection, k and v written into the KV cache at
// each token's (sequence, position). See rope_kv_append.cu.
#pragma once
#include "common.h"

namespace mixtral {

struct RopeKvAppendParams {
  const void* qkv;           // [T, (Hq + 2 Hkv) * D] contiguous: q heads, then k heads, then v heads
  const int32_t* positions;  // [T] position of each token in its sequence = its cache slot
  const int32_t* seq_ids;    // [T] cache row (sequence) of each token
  const float* cos_sin;      // [P, D] fp32: cos(p f_i) in columns [0, D/2), sin(p f_i) in [D/2, D)
  void* k_cache;             // [B, S, Hkv, D] contiguous, written at [seq_ids[t], positions[t]]
  void* v_cache;             // [B, S, Hkv, D] contiguous
  void* q_out;               // [T, Hq, D] contiguous
  int64_t tokens;            // T
  int q_heads;               // Hq
  int kv_heads;              // Hkv
  int head_dim;              // D (even)
  int64_t table_len;         // P
  int64_t batch;             // B (cache rows)
  int64_t cache_len;         // S (cache slots per row)
  DType dtype;               // of qkv, the caches and q_out
};

cudaError_t rope_kv_append_launch(const RopeKvAppendParams& p, cudaStream_t stream);

}  // namespace mixtral
