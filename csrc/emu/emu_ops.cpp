// The emulation build's only torch-facing file: ops on CPU tensors that run the kernels' exact source through the
// emulation runtime (csrc/emu/runtime.cpp), with the kernel path chosen explicitly, plus the runtime's self-tests
// and counters. Registered as torch.ops.mixtral_emu.* (mixtral_ext/emu.py is the Python face).
//
// Memory: every tensor a launch touches is copied into (or allocated in) the runtime's emulation region, where each
// buffer is exactly sized and followed by a redzone, so an out-of-bounds access is a report naming the buffer. After
// the launches, in-place arguments are copied back and outputs are cloned out; the region is freed per op. A report
// (race, deadlock, out-of-bounds, missing lane) becomes a RuntimeError carrying its text.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <vector>

#include "emu_host.h"

namespace {

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
    TORCH_CHECK(t.device().is_cpu(), "mixtral_ext.emu: ", name, " must be a CPU tensor, got ", t.device());
    int64_t extent = t.numel() > 0 ? 1 : 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      TORCH_CHECK(t.stride(d) >= 0, "mixtral_ext.emu: ", name, " has a negative stride");
      if (t.numel() > 0) extent += (t.size(d) - 1) * t.stride(d);
    }
    void* p = emu::buffer_alloc(static_cast<size_t>(extent) * t.element_size(), name, true);
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
  const bool known = emu::run_selftest(name, ptrs.data(), static_cast<int>(ptrs.size()), arg);
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
  m.def("selftest(str name, Tensor(a!)[] bufs, int arg) -> ()", &selftest);
  m.def("stats() -> str", &stats);
  m.def("reset_stats() -> ()", &reset_stats);
}
