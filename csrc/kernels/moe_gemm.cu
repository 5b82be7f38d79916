// Grouped (permuted) expert GEMMs for the prefill regime of moe_experts: validation and the choice of code path.
//
// Algorithm (both paths): rows are the R = T*k (token, slot) pairs in expert-sorted order; expert e owns rows
// expert_offsets[e] .. expert_offsets[e+1]-1 (device-only: tiles are enumerated on the device, no host sync).
//   GEMM1: inter[r, i] = T( silu(x[tok(r)] . w13[e, 2i]) * (x[tok(r)] . w13[e, 2i+1]) ), tok = sorted_tokens,
//          N = 2I columns of w13's interleaved gate/up rows, K = H; the silu*mul is done in the epilogue.
//   GEMM2: out_rows[r, h] = fp32( inter[r] . w2[e, h] ), N = H, K = I.
// One launch per GEMM covers all experts (persistent grid, tile scheduler in moe_gemm_common.cuh).
//   sm80 path (moe_gemm_sm80.cu): mma.sync + ldmatrix + cp.async multistage; A rows gathered by cp.async.
//   sm90 path (moe_gemm_sm90.cu): wgmma + TMA + mbarrier ring + warp specialisation; one extra launch first
//     gathers x into expert order inside out_rows (TMA cannot gather rows), which GEMM2 then overwrites.
// Path choice: MIXTRAL_EXT_MOE_PATH = auto (default: sm90 on a compute-capability-9 device whose loaded image has
// the sm_90a kernel, else sm80), sm80 (force the mma.sync path, e.g. to compare both on Hopper), sm90 (force the
// Hopper path; cudaErrorNotSupported where it cannot run), decode (always cudaErrorNotSupported, so moe_experts
// runs its decode kernels at any T: for measuring the decode/prefill threshold). Read at every call (a getenv,
// negligible next to the GEMMs), so a test or benchmark can switch paths within one process.
// T = the activation dtype, bf16 or fp16 (x, w13, w2 and inter all of it).
// Limits (else cudaErrorNotSupported, before anything is launched): bf16 or fp16; H and I multiples of 8;
// 1 <= E <= 256; R, E*2I and E*H below 2^31, tile count below 2^30; all pointers 16-byte aligned; compute
// capability >= 8.0.
// Numerics: fp32 accumulation; inter rounded to T (as the eager composite in T would); out_rows fp32.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "moe_gemm.h"
#include "moe_gemm_common.cuh"

namespace mixtral {

namespace {

enum class Path { kAuto, kSm80, kSm90, kDecode };

Path requested_path() {
  const char* v = std::getenv("MIXTRAL_EXT_MOE_PATH");
  if (v == nullptr) return Path::kAuto;
  if (std::strcmp(v, "sm80") == 0) return Path::kSm80;
  if (std::strcmp(v, "sm90") == 0) return Path::kSm90;
  if (std::strcmp(v, "decode") == 0) return Path::kDecode;
  return Path::kAuto;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

cudaError_t moe_grouped_gemm_launch(const MoeGroupedGemmParams& p, cudaStream_t stream) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return cudaErrorNotSupported;
  if (p.tokens <= 0) return cudaSuccess;
  constexpr int64_t kIntMax = 0x7fffffff;
  const int64_t R = p.tokens * p.top_k;
  if (p.top_k < 1 || p.experts < 1 || p.experts > moe_gemm::kMaxExperts) return cudaErrorNotSupported;
  if (p.hidden <= 0 || p.inter_size <= 0 || p.hidden % 8 != 0 || p.inter_size % 8 != 0) return cudaErrorNotSupported;
  if (R >= kIntMax || p.experts * 2 * p.inter_size >= kIntMax || p.experts * p.hidden >= kIntMax)
    return cudaErrorNotSupported;
  // Tile ids are int on the device: bound the largest tile count (64-row x 128-column tiles, sum over experts of
  // ceil(rows_e / 64) <= R / 64 + E) with room for the persistent loop's tile += gridDim.x.
  const int64_t max_n = std::max<int64_t>(2 * p.inter_size, p.hidden);
  if ((R / 64 + p.experts) * ((max_n + 127) / 128) >= kIntMax / 2) return cudaErrorNotSupported;
  if (!aligned16(p.x) || !aligned16(p.w13) || !aligned16(p.w2) || !aligned16(p.inter) || !aligned16(p.out_rows))
    return cudaErrorNotSupported;
  if (p.sm_major < 8 || p.sm_count < 1) return cudaErrorNotSupported;

  const Path path = requested_path();
  if (path == Path::kDecode) return cudaErrorNotSupported;
  if (path != Path::kSm80 && p.sm_major == 9 && moe_gemm::sm90_available()) {
    const cudaError_t err = moe_gemm::sm90_run(p, stream);
    // NotSupported comes back only before any launch (no tensor-map encoder, too little shared memory, or a
    // register count that setmaxnreg cannot rebalance).
    if (err != cudaErrorNotSupported || path == Path::kSm90) return err;
  } else if (path == Path::kSm90) {
    return cudaErrorNotSupported;
  }
  if (!moe_gemm::sm80_available()) return cudaErrorNotSupported;
  return moe_gemm::sm80_run(p, stream);
}

}  // namespace mixtral
