// moe_experts: validation, the choice of code path, and the launch sequence (moe_experts.h lists the paths).
//
// Algorithm (every path): rows are the R = T*k (token, slot) pairs in expert-sorted order; expert e owns rows
// expert_offsets[e] .. expert_offsets[e+1]-1 (device-only: the kernels find an expert's rows on the device, no host
// sync).
//   1: inter[r, i] = T( silu(x[tok(r)] . w13[e, 2i]) * (x[tok(r)] . w13[e, 2i+1]) ), tok = sorted_tokens.
//   2: out_rows[r, h] = fp32( inter[r] . w2[e, h] ).
//   combine: y[t] = T( sum over slots s in order of topk_weights[t, s] * out_rows[token_rows[t, s]] ).
// Paths for 1 and 2:
//   decode (moe_experts_decode.cu): GEMVs streaming each active expert's weights once; dense, int8 or int4.
//   sm80 (moe_experts_sm80.cu): grouped GEMM, mma.sync + ldmatrix + cp.async multistage; A rows gathered by cp.async.
//   sm90 (moe_experts_sm90.cu): grouped GEMM, wgmma + TMA + mbarrier ring + warp specialisation; one extra launch
//     first gathers x into expert order inside out_rows (TMA cannot gather rows), which GEMM2 then overwrites.
// The grouped GEMMs read dense tiles: with a quantized format they run on copies of w13 / w2 expanded to T first
// (one streaming kernel each; ~1 ms per Mixtral layer at 4 TB/s, against ~3.7 ms for the GEMMs of a 4096-token
// prompt).
// The choice (moe_experts_select_path) is made up front on the host from the params alone: sizes, dtype, the device
// attributes and which kernel images this build loaded. Nothing is launched when an asked-for path cannot run.
// T = the activation dtype, bf16 or fp16 (x, inter, y; w13 and w2 when dense).
// Limits: moe_experts_supported (bf16 or fp16; 1 <= E <= 64; H and I positive multiples of 8, 16 for int8, 128 for
// int4); k >= 1; R below 2^31. The grouped GEMMs also need E*2I and E*H below 2^31, a tile count below 2^30,
// 16-byte aligned tensors and compute capability >= 8.0 (else the automatic choice is the GEMVs).
// Numerics: fp32 accumulation; inter rounded to T (as the eager composite in T would); out_rows fp32.
#include <algorithm>
#include <cstdint>

#include "moe_experts.h"
#include "moe_experts_common.cuh"

namespace mixtral {

namespace {

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool quantized(const MoeExpertsParams& p) { return p.wformat != WeightFormat::kDense; }

// The limits every path shares (the GEMVs' and the combine's).
bool valid(const MoeExpertsParams& p) {
  if (p.wformat != WeightFormat::kDense && p.wformat != WeightFormat::kInt8 && p.wformat != WeightFormat::kInt4)
    return false;
  if (!moe_experts_supported(p.experts, p.hidden, p.inter_size, p.wformat, p.dtype)) return false;
  // Quantized weights come with their scales.
  if (quantized(p) && (p.w13_scale == nullptr || p.w2_scale == nullptr)) return false;
  return p.top_k >= 1 && p.tokens >= 0 && p.tokens * p.top_k < 0x7fffffff;
}

// What a grouped GEMM needs beyond valid(): int32 tile arithmetic, 16-byte aligned operands (TMA and cp.async
// move 16-byte chunks), a tensor-core device. The weights are checked as the GEMMs will read them: the dense
// tensors, or the dequantize workspaces (allocated after the choice, so not checked here).
bool grouped_gemm_shapes_ok(const MoeExpertsParams& p) {
  constexpr int64_t kIntMax = 0x7fffffff;
  const int64_t R = p.tokens * p.top_k;
  if (p.experts > moe_experts::kMaxExperts) return false;
  if (p.experts * 2 * p.inter_size >= kIntMax || p.experts * p.hidden >= kIntMax) return false;
  // Tile ids are int on the device: bound the largest tile count (64-row x 128-column tiles, sum over experts of
  // ceil(rows_e / 64) <= R / 64 + E) with room for the persistent loop's tile += gridDim.x.
  const int64_t max_n = std::max<int64_t>(2 * p.inter_size, p.hidden);
  if ((R / 64 + p.experts) * ((max_n + 127) / 128) >= kIntMax / 2) return false;
  if (!aligned16(p.x) || !aligned16(p.inter) || !aligned16(p.out_rows)) return false;
  if (!quantized(p) && (!aligned16(p.w13) || !aligned16(p.w2))) return false;
  return p.sm_major >= 8 && p.sm_count >= 1;
}

// The params the grouped-GEMM paths see: dense weights (the dequantized copies for a quantized format).
MoeExpertsParams dense_view(const MoeExpertsParams& p) {
  MoeExpertsParams d = p;
  if (quantized(p)) {
    d.w13 = p.w13_dequant;
    d.w2 = p.w2_dequant;
    d.wformat = WeightFormat::kDense;
    d.w13_scale = nullptr;
    d.w2_scale = nullptr;
  }
  return d;
}

bool sm80_runs(const MoeExpertsParams& p) { return grouped_gemm_shapes_ok(p) && moe_experts::sm80_supported(p); }
bool sm90_runs(const MoeExpertsParams& p) { return grouped_gemm_shapes_ok(p) && moe_experts::sm90_supported(p); }

}  // namespace

MoeExpertsPath moe_experts_select_path(const MoeExpertsParams& p) {
  if (!valid(p)) return MoeExpertsPath::kUnavailable;
  switch (p.path) {
    case MoeExpertsPath::kDecode: return MoeExpertsPath::kDecode;
    case MoeExpertsPath::kSm80: return sm80_runs(p) ? MoeExpertsPath::kSm80 : MoeExpertsPath::kUnavailable;
    case MoeExpertsPath::kSm90: return sm90_runs(p) ? MoeExpertsPath::kSm90 : MoeExpertsPath::kUnavailable;
    case MoeExpertsPath::kGroupedGemm:
      if (sm90_runs(p)) return MoeExpertsPath::kSm90;
      return sm80_runs(p) ? MoeExpertsPath::kSm80 : MoeExpertsPath::kUnavailable;
    case MoeExpertsPath::kAuto:
      // Decode sizes: the GEMVs read each active expert once, where a GEMM tile would be mostly padding.
      if (p.tokens <= kMoeExpertsDecodeMaxTokens) return MoeExpertsPath::kDecode;
      if (sm90_runs(p)) return MoeExpertsPath::kSm90;
      if (sm80_runs(p)) return MoeExpertsPath::kSm80;
      return MoeExpertsPath::kDecode;  // the GEMVs take any T, slowly (each chunk of rows re-streams the weights)
    default: return MoeExpertsPath::kUnavailable;
  }
}

bool moe_experts_needs_dequant(const MoeExpertsParams& p, MoeExpertsPath path) {
  return quantized(p) && (path == MoeExpertsPath::kSm80 || path == MoeExpertsPath::kSm90);
}

const char* moe_experts_path_name(MoeExpertsPath path) {
  switch (path) {
    case MoeExpertsPath::kAuto: return "auto";
    case MoeExpertsPath::kDecode: return "decode";
    case MoeExpertsPath::kGroupedGemm: return "grouped_gemm";
    case MoeExpertsPath::kSm80: return "sm80";
    case MoeExpertsPath::kSm90: return "sm90";
    default: return "unavailable";
  }
}

cudaError_t moe_experts_launch(const MoeExpertsParams& p, cudaStream_t stream) {
  if (!valid(p)) return cudaErrorInvalidValue;
  if (p.tokens == 0) return cudaSuccess;
  const MoeExpertsPath path = moe_experts_select_path(p);
  if (path == MoeExpertsPath::kUnavailable) return cudaErrorNotSupported;
  cudaError_t err = cudaSuccess;
  if (path == MoeExpertsPath::kDecode) {
    err = moe_experts::decode_run(p, stream);
  } else {
    if (moe_experts_needs_dequant(p, path)) {
      if (!aligned16(p.w13_dequant) || !aligned16(p.w2_dequant) || p.w13_dequant == nullptr ||
          p.w2_dequant == nullptr)
        return cudaErrorInvalidValue;
      err = moe_experts::dequantize_run(p.w13, p.w13_scale, p.w13_dequant, p.experts * 2 * p.inter_size, p.hidden,
                                        p.wformat, p.dtype, stream);
      if (err == cudaSuccess)
        err = moe_experts::dequantize_run(p.w2, p.w2_scale, p.w2_dequant, p.experts * p.hidden, p.inter_size,
                                          p.wformat, p.dtype, stream);
      if (err != cudaSuccess) return err;
    }
    const MoeExpertsParams d = dense_view(p);
    err = path == MoeExpertsPath::kSm90 ? moe_experts::sm90_run(d, stream) : moe_experts::sm80_run(d, stream);
  }
  if (err != cudaSuccess) return err;
  return moe_experts::combine_run(p, stream);
}

}  // namespace mixtral
