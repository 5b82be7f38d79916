// The emulation build's only torch-facing file: ops on CPU tensors that run the kernels' exact source through the
// emulation runtime (csrc/emu/runtime.cpp), with the kernel path chosen explicitly, plus the runtime's self-tests
// and counters. Registered as torch.ops.mixtral_emu.* (mixtral_ext/emu.py is the Python face).
//
// Memory: every tensor a launch touches is copied into (or allocated in) the runtime's emulation region, where each
// buffer is exactly sized and followed by a redzone, so an out-of-bounds access is a report naming the buffer. After
// the launches, in-place arguments are copied back and outputs are cloned out; the region is freed per op. A report
// (race, deadlock, out-of-bounds, missing lane) becomes a RuntimeError carrying its text.
// The kernels' headers see only the host half of the CUDA stand-ins (cudaError_t, cudaStream_t, ...).
#define MIXTRAL_EMU 1
#define MIXTRAL_EMU_HOST_ONLY 1
#include <ATen/ATen.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <vector>

#include "emu_host.h"
#include "op_impl.h"

namespace {

using namespace mixtral::binding;

std::mutex g_mu;  // the runtime runs one op at a time

// One op's use of the emulation region: buffers named for reports, freed when the scope ends.
class RegionScope {
 public:
  RegionScope() {
    emu::clear_error();
    emu::region_reset();
  }
  ~RegionScope() { emu::region_reset(); }
  RegionScope(const RegionScope&) = delete;
  RegionScope& operator=(const RegionScope&) = delete;

  // A copy of `t` in the region with t's sizes and strides (a strided view keeps its layout: the buffer spans the
  // view's extent, elements between the view's rows are NaN bytes).
  at::Tensor copy_in(const at::Tensor& t, const std::string& name) {
    TORCH_CHECK(t.device().is_cpu(), "mixtral_ext.emu: ", name, " must be a CPU tensor, got device ", t.device());
    int64_t extent = t.numel() > 0 ? 1 : 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      TORCH_CHECK(t.stride(d) >= 0, "mixtral_ext.emu: ", name, " has a negative stride");
      if (t.numel() > 0) extent += (t.size(d) - 1) * t.stride(d);
    }
    void* p = emu::buffer_alloc(static_cast<size_t>(extent) * t.element_size(), name, true,
                                reinterpret_cast<uintptr_t>(t.data_ptr()));
    at::Tensor r = at::from_blob(p, t.sizes(), t.strides(), t.options());
    r.copy_(t);
    return r;
  }
  // A contiguous uninitialised tensor in the region (0xFF bytes: elements a kernel never writes read as NaN / -1).
  at::Tensor empty(at::IntArrayRef sizes, at::TensorOptions opts, const std::string& name) {
    int64_t n = 1;
    for (int64_t s : sizes) n *= s;
    void* p = emu::buffer_alloc(static_cast<size_t>(n) * opts.dtype().itemsize(), name, true);
    return at::from_blob(p, sizes, opts);
  }
};

void throw_if_reported(const char* op) {
  const std::string& e = emu::error();
  TORCH_CHECK(e.empty(), op, ": ", e);
}

// The emulation backend of op_impl.h: CPU tensors in the region, the kernel path chosen by the caller.
struct EmuBackend {
  static constexpr const char* kDeviceWord = "CPU";
  RegionScope& region;
  int arch = 80;                 // the architecture the CUDA stand-ins report (80 or 90)
  mixtral::MoeExpertsPath moe_path = mixtral::MoeExpertsPath::kAuto;  // moe_experts: the path asked for
  int splits = 0;                // attention_decode: forced split count, 0 = the launcher's choice

  bool on_device(const at::Tensor& t) const { return t.device().is_cpu(); }
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts, const char* name) const {
    return region.empty(sizes, opts, name);
  }
  int guard(const at::Tensor&) const { return 0; }
  cudaStream_t stream() const { return nullptr; }
  // Not cached: the stand-ins answer for the architecture of this call (check_arch sets it).
  DeviceAttrs device_attrs(const at::Tensor&) const { return read_device_attrs(0); }
  void check_launch(const char* op, cudaError_t err) const {
    const std::string& report = emu::error();
    TORCH_CHECK(report.empty(), op, ": ", report);
    TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  }
  mixtral::AttnPath attn_prefill_path(const at::Tensor&) const {
    return arch >= 90 ? mixtral::AttnPath::kSm90 : mixtral::AttnPath::kSm80;
  }
  int decode_splits(int n) const { return splits > 0 ? std::min(splits, 64) : n; }
  mixtral::MoeExpertsPath moe_experts_path() const { return moe_path; }
};

int check_arch(const char* op, int64_t arch) {
  TORCH_CHECK(arch == 80 || arch == 90, op, ": arch must be 80 or 90, got ", arch);
  emu::set_arch(static_cast<int>(arch));
  return static_cast<int>(arch);
}

at::Tensor rms_norm_emu(const at::Tensor& x, const at::Tensor& weight, double eps,
                        const std::optional<at::Tensor>& residual, int64_t arch) {
  constexpr const char* op = "mixtral_ext.emu.rms_norm";
  const std::lock_guard<std::mutex> lock(g_mu);
  RegionScope region;
  EmuBackend b{region, check_arch(op, arch)};
  std::optional<at::Tensor> r;
  if (residual) r = region.copy_in(*residual, "residual");
  at::Tensor out = rms_norm_impl(b, region.copy_in(x, "x"), region.copy_in(weight, "weight"), eps, r);
  throw_if_reported(op);
  if (residual) residual->copy_(*r);
  return out.clone();
}

at::Tensor rope_kv_append_emu(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& seq_ids,
                              const at::Tensor& cos_sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              int64_t arch) {
  constexpr const char* op = "mixtral_ext.emu.rope_kv_append";
  const std::lock_guard<std::mutex> lock(g_mu);
  RegionScope region;
  EmuBackend b{region, check_arch(op, arch)};
  at::Tensor kc = region.copy_in(k_cache, "k_cache"), vc = region.copy_in(v_cache, "v_cache");
  at::Tensor q = rope_kv_append_impl(b, region.copy_in(qkv, "qkv"), region.copy_in(positions, "positions"),
                                     region.copy_in(seq_ids, "seq_ids"), region.copy_in(cos_sin, "cos_sin"), kc, vc);
  throw_if_reported(op);
  k_cache.copy_(kc);
  v_cache.copy_(vc);
  return q.clone();
}

at::Tensor attention_prefill_emu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k, int64_t max_seqlen_q,
                                 double scale, int64_t window, int64_t arch) {
  constexpr const char* op = "mixtral_ext.emu.attention_prefill";
  const std::lock_guard<std::mutex> lock(g_mu);
  RegionScope region;
  EmuBackend b{region, check_arch(op, arch)};
  at::Tensor out = attention_prefill_impl(b, region.copy_in(q, "q"), region.copy_in(k_cache, "k_cache"),
                                          region.copy_in(v_cache, "v_cache"),
                                          region.copy_in(cu_seqlens_q, "cu_seqlens_q"),
                                          region.copy_in(seq_lens_k, "seq_lens_k"), max_seqlen_q, scale, window);
  throw_if_reported(op);
  return out.clone();
}

at::Tensor attention_decode_emu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& seq_lens, double scale, int64_t window, int64_t splits,
                                int64_t arch) {
  constexpr const char* op = "mixtral_ext.emu.attention_decode";
  TORCH_CHECK(splits >= 0 && splits <= 64, op, ": splits must be in 0..64 (0: the launcher's choice), got ", splits);
  const std::lock_guard<std::mutex> lock(g_mu);
  RegionScope region;
  EmuBackend b{region, check_arch(op, arch)};
  b.splits = static_cast<int>(splits);
  at::Tensor out = attention_decode_impl(b, region.copy_in(q, "q"), region.copy_in(k_cache, "k_cache"),
                                         region.copy_in(v_cache, "v_cache"), region.copy_in(seq_lens, "seq_lens"),
                                         scale, window);
  throw_if_reported(op);
  return out.clone();
}

// path: "single" (one launch) or "multi" (count, scan, scatter); the launcher picks by T, so this states which one
// the caller expects to run and fails if the other did ("auto": whichever the launcher picks).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_emu(
    const at::Tensor& router_logits, int64_t top_k, const std::string& path, int64_t arch) {
  constexpr const char* op = "mixtral_ext.emu.moe_route";
  TORCH_CHECK(path == "single" || path == "multi" || path == "auto", op,
              ": path must be 'single', 'multi' or 'auto', got '", path, "'");
  const std::lock_guard<std::mutex> lock(g_mu);
  RegionScope region;
  EmuBackend b{region, check_arch(op, arch)};
  const size_t before = emu::launch_count();
  auto [w, ids, counts, offsets, sorted, rows] = moe_route_impl(b, region.copy_in(router_logits, "router_logits"),
                                                                top_k);
  throw_if_reported(op);
  const size_t launches = emu::launch_count() - before;
  TORCH_CHECK(path == "auto" || launches == (path == "single" ? 1u : 3u), op, ": path '", path, "' asked, but the launcher made ",
              launches, " launch(es) for T = ", router_logits.size(0));
  return {w.clone(), ids.clone(), counts.clone(), offsets.clone(), sorted.clone(), rows.clone()};
}

// Both MoE expert ops. regime: "decode" (the GEMVs; on quantized bytes for moe_experts_quant) or "prefill" (the
// grouped GEMM, after the dequantize kernel for moe_experts_quant: on arch 90 the sm90 path where it can run, else
// sm80; neither running is an error). Quantized when w13_scale is given (bits 8: int8, 4: packed int4).
at::Tensor moe_experts_emu_run(const char* op, const at::Tensor& x, const at::Tensor& topk_weights,
                               const at::Tensor& topk_ids, const at::Tensor& expert_offsets,
                               const at::Tensor& sorted_tokens, const at::Tensor& token_rows, const at::Tensor& w13,
                               const at::Tensor* w13_scale, const at::Tensor& w2, const at::Tensor* w2_scale,
                               int64_t bits, const std::string& regime, int64_t arch) {
  TORCH_CHECK(regime == "decode" || regime == "prefill", op, ": regime must be 'decode' or 'prefill', got '", regime,
              "'");
  const std::lock_guard<std::mutex> lock(g_mu);
  RegionScope region;
  EmuBackend b{region, check_arch(op, arch),
               regime == "prefill" ? mixtral::MoeExpertsPath::kGroupedGemm : mixtral::MoeExpertsPath::kDecode};
  const at::Tensor xr = region.copy_in(x, "x"), wr = region.copy_in(topk_weights, "topk_weights"),
                   ids = region.copy_in(topk_ids, "topk_ids"), offs = region.copy_in(expert_offsets, "expert_offsets"),
                   sorted = region.copy_in(sorted_tokens, "sorted_tokens"),
                   rows = region.copy_in(token_rows, "token_rows"), w13r = region.copy_in(w13, "w13"),
                   w2r = region.copy_in(w2, "w2");
  at::Tensor y = w13_scale == nullptr
                     ? moe_experts_impl(b, xr, wr, ids, offs, sorted, rows, w13r, w2r)
                     : moe_experts_quant_impl(b, xr, wr, ids, offs, sorted, rows, w13r,
                                              region.copy_in(*w13_scale, "w13_scale"), w2r,
                                              region.copy_in(*w2_scale, "w2_scale"), bits);
  throw_if_reported(op);
  return y.clone();
}

at::Tensor moe_experts_emu(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                           const at::Tensor& expert_offsets, const at::Tensor& sorted_tokens,
                           const at::Tensor& token_rows, const at::Tensor& w13, const at::Tensor& w2,
                           const std::string& regime, int64_t arch) {
  return moe_experts_emu_run("mixtral_ext.emu.moe_experts", x, topk_weights, topk_ids, expert_offsets, sorted_tokens,
                             token_rows, w13, nullptr, w2, nullptr, 0, regime, arch);
}

at::Tensor moe_experts_quant_emu(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                 const at::Tensor& expert_offsets, const at::Tensor& sorted_tokens,
                                 const at::Tensor& token_rows, const at::Tensor& w13, const at::Tensor& w13_scale,
                                 const at::Tensor& w2, const at::Tensor& w2_scale, int64_t bits,
                                 const std::string& regime, int64_t arch) {
  return moe_experts_emu_run("mixtral_ext.emu.moe_experts_quant", x, topk_weights, topk_ids, expert_offsets,
                             sorted_tokens, token_rows, w13, &w13_scale, w2, &w2_scale, bits, regime, arch);
}

// ---- the runtime's own known-answer kernels ---------------------------------------------------------------------
void selftest(const std::string& name, const std::vector<at::Tensor>& bufs, int64_t arg) {
  const std::lock_guard<std::mutex> lock(g_mu);
  RegionScope region;
  std::vector<at::Tensor> in;
  std::vector<void*> ptrs;
  for (size_t i = 0; i < bufs.size(); ++i) {
    in.push_back(region.copy_in(bufs[i], "buf" + std::to_string(i)));
    ptrs.push_back(in.back().data_ptr());
  }
  emu::set_arch(80);
  const bool known = emu::run_selftest(name, ptrs.data(), static_cast<int>(ptrs.size()), arg) ||
                     emu::run_ptx_selftest(name, ptrs.data(), static_cast<int>(ptrs.size()), arg);
  TORCH_CHECK(known, "mixtral_ext.emu.selftest: unknown kernel '", name, "' for ", bufs.size(), " buffers");
  throw_if_reported("mixtral_ext.emu.selftest");
  for (size_t i = 0; i < bufs.size(); ++i) bufs[i].copy_(in[i]);
}

std::string stats() {
  const std::lock_guard<std::mutex> lock(g_mu);
  return emu::stats_json();
}

void reset_stats() {
  const std::lock_guard<std::mutex> lock(g_mu);
  emu::reset_stats();
}

}  // namespace

TORCH_LIBRARY(mixtral_emu, m) {
  // Each op: the mixtral_ext op's arguments, then the kernel path (arch 80 | 90, and the op's own choice).
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!)? residual, int arch) -> Tensor", &rms_norm_emu);
  m.def("rope_kv_append(Tensor qkv, Tensor positions, Tensor seq_ids, Tensor cos_sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int arch) -> Tensor", &rope_kv_append_emu);
  m.def("attention_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q, Tensor seq_lens_k, "
        "int max_seqlen_q, float scale, int window, int arch) -> Tensor", &attention_prefill_emu);
  m.def("attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, float scale, int window, "
        "int splits, int arch) -> Tensor", &attention_decode_emu);
  m.def("moe_route(Tensor router_logits, int top_k, str path, int arch) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)", &moe_route_emu);
  m.def("moe_experts(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor expert_offsets, Tensor sorted_tokens, "
        "Tensor token_rows, Tensor w13, Tensor w2, str regime, int arch) -> Tensor", &moe_experts_emu);
  m.def("moe_experts_quant(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor expert_offsets, "
        "Tensor sorted_tokens, Tensor token_rows, Tensor w13, Tensor w13_scale, Tensor w2, Tensor w2_scale, int bits, "
        "str regime, int arch) -> Tensor", &moe_experts_quant_emu);
  m.def("selftest(str name, Tensor(a!)[] bufs, int arg) -> ()", &selftest);
  m.def("stats() -> str", &stats);
  m.def("reset_stats() -> ()", &reset_stats);
  define_supported_ops(m);  // the CUDA build's *_supported predicates, the very same code
}
