// The CUDA binding: the real kernels for the ops whose schemas mixtral_ext/ops.py defines, on CUDA tensors.
//
// The tensor -> params logic of every op (checks, outputs, launches) lives in op_impl.h, shared with the emulation
// binding (csrc/emu/emu_ops.cpp); this file is its CUDA backend: CUDA tensors, at::empty, the device guard, the current
// stream, the attention_prefill and moe_experts path settings and the per-device attribute cache. Nothing here
// synchronises with the host, so every op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>

#include "env.h"
#include "op_impl.h"

#ifndef MIXTRAL_EXT_ARCH_LIST
#define MIXTRAL_EXT_ARCH_LIST "unknown"
#endif
// Read from the file by `mixtral-ext doctor` (no GPU needed): the architectures this library was compiled for.
extern "C" __attribute__((used, visibility("default"))) const char mixtral_ext_arch_list[] =
    "mixtral_ext_arch_list=" MIXTRAL_EXT_ARCH_LIST;

namespace {

using namespace mixtral::binding;

// The attributes of each device, read once per device (host queries, no sync) and shared by every op.
DeviceAttrs cached_device_attrs(int device) {
  static std::mutex mu;
  static std::unordered_map<int, DeviceAttrs> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  return cache.emplace(device, read_device_attrs(device)).first->second;
}

// Which kernel serves attention_prefill: MIXTRAL_EXT_ATTN_PATH=auto|sm80|sm90 (default auto), read once per process.
// auto: the Hopper wgmma kernel on compute capability 9.x when this build holds it (sm_90a pass), else the sm_80
// mma.sync kernel; sm80 forces the mma.sync kernel on any GPU (to test it on Hopper); sm90 errors where unavailable.
enum class AttnPathChoice { kAuto = 0, kSm80 = 1, kSm90 = 2 };  // indices into the accepted words below

AttnPathChoice attn_path_choice() {
  static const auto choice =
      static_cast<AttnPathChoice>(mixtral::env::choice("MIXTRAL_EXT_ATTN_PATH", {"auto", "sm80", "sm90"}));
  return choice;
}

// Which code path serves moe_experts (and moe_experts_quant): MIXTRAL_EXT_MOE_PATH=auto|decode|sm80|sm90 (default
// auto: the launcher's choice by T and device, moe_experts.h). decode, sm80 and sm90 force that path at any T, for
// tests and benchmarks (decode at large T measures the decode/prefill threshold); a forced path that cannot run is
// an error. Read on every call (a getenv, negligible next to the GEMMs): the tests and benchmarks switch paths within
// one process.
mixtral::MoeExpertsPath moe_experts_path() {
  constexpr mixtral::MoeExpertsPath kPaths[] = {mixtral::MoeExpertsPath::kAuto, mixtral::MoeExpertsPath::kDecode,
                                                mixtral::MoeExpertsPath::kSm80, mixtral::MoeExpertsPath::kSm90};
  return kPaths[mixtral::env::choice("MIXTRAL_EXT_MOE_PATH", {"auto", "decode", "sm80", "sm90"})];
}

mixtral::AttnPath attn_prefill_path(const at::Tensor& q) {
  const AttnPathChoice choice = attn_path_choice();
  if (choice == AttnPathChoice::kSm80) return mixtral::AttnPath::kSm80;
  const bool hopper = cached_device_attrs(q.device().index()).sm_major == 9;
  // Asked once, on the first Hopper call (the loaded binary's architecture is the same for every Hopper GPU).
  const bool usable = hopper && [] {
    static const bool built = mixtral::attention_prefill_sm90_available();
    return built;
  }();
  TORCH_CHECK(choice != AttnPathChoice::kSm90 || usable, "mixtral_ext::attention_prefill: MIXTRAL_EXT_ATTN_PATH="
              "sm90 needs a compute capability 9.x GPU and a build with the sm_90a kernel (MIXTRAL_EXT_ARCH containing "
              "90a)");
  return usable ? mixtral::AttnPath::kSm90 : mixtral::AttnPath::kSm80;
}

struct CudaBackend {
  static constexpr const char* kDeviceWord = "CUDA";
  bool on_device(const at::Tensor& t) const { return t.is_cuda(); }
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts, const char* /*name*/) const {
    return at::empty(sizes, opts);
  }
  c10::cuda::CUDAGuard guard(const at::Tensor& t) const { return c10::cuda::CUDAGuard(t.device()); }
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream(); }
  DeviceAttrs device_attrs(const at::Tensor& t) const { return cached_device_attrs(t.device().index()); }
  void check_launch(const char* op, cudaError_t err) const {
    TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  }
  mixtral::AttnPath attn_prefill_path(const at::Tensor& q) const { return ::attn_prefill_path(q); }
  // MIXTRAL_EXT_DECODE_SPLITS=n in 1..64 forces n splits, for tests of the split/combine path. Read on every call:
  // the tests change it within one process.
  int decode_splits(int n) const { return mixtral::env::integer("MIXTRAL_EXT_DECODE_SPLITS", 1, 64, n); }
  mixtral::MoeExpertsPath moe_experts_path() const { return ::moe_experts_path(); }
};

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps,
                         const std::optional<at::Tensor>& residual) {
  CudaBackend b;
  return rms_norm_impl(b, x, weight, eps, residual);
}

at::Tensor attention_prefill_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k, int64_t max_seqlen_q,
                                  double scale, int64_t window) {
  CudaBackend b;
  return attention_prefill_impl(b, q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, max_seqlen_q, scale, window);
}

at::Tensor rope_kv_append_cuda(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& seq_ids,
                               const at::Tensor& cos_sin, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  CudaBackend b;
  return rope_kv_append_impl(b, qkv, positions, seq_ids, cos_sin, k_cache, v_cache);
}

at::Tensor attention_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& seq_lens, double scale, int64_t window) {
  CudaBackend b;
  return attention_decode_impl(b, q, k_cache, v_cache, seq_lens, scale, window);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(
    const at::Tensor& router_logits, int64_t top_k) {
  CudaBackend b;
  return moe_route_impl(b, router_logits, top_k);
}

at::Tensor moe_experts_cuda(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                            const at::Tensor& expert_offsets, const at::Tensor& sorted_tokens,
                            const at::Tensor& token_rows, const at::Tensor& w13, const at::Tensor& w2) {
  CudaBackend b;
  return moe_experts_impl(b, x, topk_weights, topk_ids, expert_offsets, sorted_tokens, token_rows, w13, w2);
}

at::Tensor moe_experts_quant_cuda(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                  const at::Tensor& expert_offsets, const at::Tensor& sorted_tokens,
                                  const at::Tensor& token_rows, const at::Tensor& w13, const at::Tensor& w13_scale,
                                  const at::Tensor& w2, const at::Tensor& w2_scale, int64_t bits) {
  CudaBackend b;
  return moe_experts_quant_impl(b, x, topk_weights, topk_ids, expert_offsets, sorted_tokens, token_rows, w13,
                                w13_scale, w2, w2_scale, bits);
}


}  // namespace

// The *_supported predicates (op_impl.h): schemas of their own, next to those mixtral_ext/ops.py defines from Python.
TORCH_LIBRARY_FRAGMENT(mixtral_ext, m) { define_supported_ops(m); }

TORCH_LIBRARY_IMPL(mixtral_ext, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("attention_prefill", &attention_prefill_cuda);
  m.impl("rope_kv_append", &rope_kv_append_cuda);
  m.impl("attention_decode", &attention_decode_cuda);
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_experts", &moe_experts_cuda);
  m.impl("moe_experts_quant", &moe_experts_quant_cuda);
}
