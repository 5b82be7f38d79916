// moe_experts (and moe_experts_quant): the routed experts' SwiGLU FFN, y[t] = sum over slots s of
// topk_weights[t, s] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])), e = topk_ids[t, s].
//
// One params struct and one launcher; the launcher chooses the code path (moe_experts.cu):
//   decode GEMVs         moe_experts_decode.cu   weights streamed once at memory bandwidth; dense, int8 or int4
//   sm80 grouped GEMM    moe_experts_sm80.cu     mma.sync + cp.async, any compute capability >= 8.0
//   sm90a grouped GEMM   moe_experts_sm90.cu     wgmma + TMA, compute capability 9.x with the sm_90a build
// then the weighted combine back to token order (moe_experts_decode.cu). Quantized weights on a grouped-GEMM path
// are first expanded to the activation dtype (the dequantize kernel, moe_experts_decode.cu).
#pragma once
#include "common.h"

namespace mixtral {

// At or below this many tokens the automatic choice is the decode GEMVs; above it, the grouped GEMM. 64 is a first
// guess: it must be measured on the GPU (bench/kbench/moe_experts_prefill.py times both). The GEMVs stay correct for
// any T (they loop over row chunks of an expert).
constexpr int64_t kMoeExpertsDecodeMaxTokens = 64;

// How the expert weights are stored (mixtral_ext/quant.py): dense in the activation dtype; int8 with a float32 scale
// per output row; or int4, two a byte (input 2j in the low nibble of byte j, 4-bit two's complement), with a float32
// scale per output row and group of kInt4Group consecutive inputs. The GEMVs dequantize in registers (w = q * scale
// in fp32, as the reference does) and accumulate in fp32.
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
// moe_experts_width_multiple(wformat). Every path: the grouped GEMMs take every shape the decode GEMVs take.
// The binding's checks, moe_experts_launch's limits and mixtral_ext/ops.py (kernel_supported) ask this.
inline bool moe_experts_supported(int64_t experts, int64_t hidden, int64_t inter_size, WeightFormat wformat,
                                  DType dtype) {
  const int64_t multiple = moe_experts_width_multiple(wformat);
  return experts >= 1 && experts <= kMoeMaxExperts && hidden > 0 && inter_size > 0 && hidden % multiple == 0 &&
         inter_size % multiple == 0 && (dtype == DType::kBFloat16 || dtype == DType::kFloat16);
}

// The code path. kAuto: the decode GEMVs at T <= kMoeExpertsDecodeMaxTokens, else kGroupedGemm when a grouped GEMM
// can run, else the GEMVs. kGroupedGemm: sm90 where it can run (compute capability 9.x, sm_90a image, shared memory
// and register budget), else sm80. kDecode / kSm80 / kSm90 force one path at any T. A path that is asked for
// (anything but kAuto) and cannot run is an error: nothing falls back.
enum class MoeExpertsPath : int { kAuto = 0, kDecode = 1, kGroupedGemm = 2, kSm80 = 3, kSm90 = 4, kUnavailable = 5 };

// Rows are the R = T*k (token, slot) pairs in expert-sorted order (moe_route's sorted_tokens / expert_offsets).
struct MoeExpertsParams {
  const void* x;               // [T, H] token order, dtype
  const float* topk_weights;   // [T, k] routing weights
  const int* sorted_tokens;    // [R] token of each expert-sorted row
  const int* expert_offsets;   // [E + 1] rows of expert e are expert_offsets[e] .. expert_offsets[e+1]-1
  const int* token_rows;       // [T, k] expert-sorted row of each (token, slot)
  const void* w13;             // [E, 2I, H] w1/w3 interleaved by row (2i: gate unit i, 2i+1: up unit i); int8
                               // [E, 2I, H] or packed int4 [E, 2I, H/2] bytes with a quantized format
  const void* w2;              // [E, H, I]; int8 [E, H, I] or packed int4 [E, H, I/2]
  WeightFormat wformat;        // kDense (the zero value) or a quantized format with the scales below
  const float* w13_scale;      // quantized only: [E, 2I] (int8) or [E, 2I, H/128] (int4)
  const float* w2_scale;       // quantized only: [E, H] (int8) or [E, H, I/128] (int4)
  void* w13_dequant;           // quantized on a grouped-GEMM path only (moe_experts_needs_dequant): [E, 2I, H] dtype
  void* w2_dequant;            //   and [E, H, I] dtype workspaces for the expanded weights; else unused
  void* inter;                 // [R, I] workspace, dtype: silu(gate) * up, rounded once to dtype
  float* out_rows;             // [R, H] fp32 workspace: w2[e] @ inter[r], unweighted (the combine weights them); the
                               // sm90 path also uses it as scratch for the expert-ordered copy of x before GEMM2
  void* y;                     // [T, H] dtype output
  int64_t tokens;              // T
  int64_t hidden;              // H, a multiple of moe_experts_width_multiple(wformat)
  int64_t inter_size;          // I, the same multiple as H
  int experts;                 // E <= kMoeMaxExperts
  int top_k;                   // k
  int sm_count;                // device attributes: for the persistent tile scheduler,
  int max_smem_optin;          //   the opt-in shared memory per block (bytes),
  int sm_major;                //   and the compute capability (9 can run the sm90 path)
  DType dtype;                 // of x, inter, y (and of w13, w2 when dense): kBFloat16 or kFloat16
  MoeExpertsPath path;         // the path asked for (kAuto: the launcher's choice)
};

// The path moe_experts_launch runs for p: kDecode, kSm80 or kSm90; kUnavailable when p.path asks for a path that
// cannot run with these sizes, dtype, device or build. Host-only (no launch, no sync).
MoeExpertsPath moe_experts_select_path(const MoeExpertsParams& p);

// Whether `path` (a selected path) needs p.w13_dequant / p.w2_dequant: quantized weights on a grouped GEMM.
bool moe_experts_needs_dequant(const MoeExpertsParams& p, MoeExpertsPath path);

// "auto", "decode", "grouped_gemm", "sm80", "sm90" or "unavailable": for messages.
const char* moe_experts_path_name(MoeExpertsPath path);

// Selects the path, then launches (dequantize w13 and w2 when needed) -> the path's two GEMV / GEMM launches (three
// on sm90, which first gathers x into expert order) -> the combine. cudaErrorNotSupported (nothing launched) when
// the asked-for path cannot run; cudaErrorInvalidValue for sizes outside the limits above.
cudaError_t moe_experts_launch(const MoeExpertsParams& p, cudaStream_t stream);

}  // namespace mixtral
