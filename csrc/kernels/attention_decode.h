// attention_decode: one query token per sequence against the KV cache, split-KV with a log-sum-exp combine.
// See attention_decode.cu.
#pragma once
#include "common.h"

namespace mixtral {

struct AttentionDecodeParams {
  const void* q;             // [B, Hq, D] contiguous; query head j uses kv head j / (Hq / Hkv)
  const void* k_cache;       // [B, S, Hkv, D] contiguous
  const void* v_cache;       // [B, S, Hkv, D] contiguous
  const int32_t* seq_lens;   // [B] valid slots of each sequence, including the new token (at seq_lens[b] - 1)
  void* out;                 // [B, Hq, D] contiguous
  float* ws_out;             // [splits, B, Hq, D] fp32 workspace (normalised partial outputs); only if splits > 1
  float* ws_lse;             // [splits, B, Hq] fp32 workspace (log2-sum-exp2 of each split); only if splits > 1
  int batch;                 // B
  int q_heads;               // Hq
  int kv_heads;              // Hkv
  int head_dim;              // D
  int64_t cache_len;         // S
  int window;                // W: 0 = no sliding window, else the query sees the W most recent slots (itself too)
  float scale;               // softmax scale (1/sqrt(D) for Mixtral)
  int num_splits;            // from attention_decode_num_splits (must be the value the workspace was sized for)
  DType dtype;               // of q, the caches and out: bf16 or fp16
};

// Whether the kernel is instantiated for this shape/dtype: D in {16, 32, 64, 128}, Hq / Hkv in {1, 2, 4, 8}, bf16/fp16.
bool attention_decode_supported(int head_dim, int q_heads, int kv_heads, DType dtype);

// How many blocks share one (sequence, kv head): chosen on the host from static values only (B, Hkv, the most slots
// one query can see = min(S, W) or S, the device's SM count and occupancy), never from seq_lens, so a captured graph
// stays valid when lengths change. Needs the target device to be current (occupancy query). Returns at least 1.
int attention_decode_num_splits(int batch, int q_heads, int kv_heads, int head_dim, int64_t span, DType dtype,
                                int sm_count);

cudaError_t attention_decode_launch(const AttentionDecodeParams& p, cudaStream_t stream);

}  // namespace mixtral
