// torch.ops.mixtral_emu.* for the Hopper part of the emulator: the known-answer kernels of csrc/emu/sm90_selftest.cu
// and the per-kernel register count cudaFuncGetAttributes reports (which decides the sm_90a launchers' register
// guards). Registered as a fragment of emu_ops.cpp's library; mixtral_ext/emu.py is the Python face.
#define MIXTRAL_EMU 1
#define MIXTRAL_EMU_HOST_ONLY 1
#include <ATen/ATen.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <vector>

#include "emu_host.h"

namespace emu::sm90 {
bool run_selftest(const std::string& name, void* const* bufs, int nbufs, const int64_t* args, int nargs);
}

namespace {

std::mutex g_mu;

void sm90_selftest(const std::string& name, const std::vector<at::Tensor>& bufs, const std::vector<int64_t>& args) {
  const std::lock_guard<std::mutex> lock(g_mu);
  emu::clear_error();
  emu::region_reset();
  std::vector<at::Tensor> in;
  std::vector<void*> ptrs;
  for (size_t i = 0; i < bufs.size(); ++i) {
    const at::Tensor& t = bufs[i];
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "mixtral_ext.emu.sm90_selftest: buffers must be contiguous "
                "CPU tensors");
    void* p = emu::buffer_alloc(static_cast<size_t>(t.numel()) * t.element_size(), "buf" + std::to_string(i), true);
    in.push_back(at::from_blob(p, t.sizes(), t.options()));
    in.back().copy_(t);
    ptrs.push_back(p);
  }
  emu::set_arch(90);
  const bool known = emu::sm90::run_selftest(name, ptrs.data(), static_cast<int>(ptrs.size()), args.data(),
                                             static_cast<int>(args.size()));
  const std::string report = emu::error();
  if (known && report.empty())
    for (size_t i = 0; i < bufs.size(); ++i) bufs[i].copy_(in[i]);
  emu::region_reset();
  TORCH_CHECK(known, "mixtral_ext.emu.sm90_selftest: unknown kernel '", name, "' for ", bufs.size(),
              " buffers (or the tensor map encode failed)");
  TORCH_CHECK(report.empty(), "mixtral_ext.emu.sm90_selftest: ", report);
}

void set_num_regs(int64_t regs, const std::string& kernel) {
  const std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK(regs >= 0 && regs <= 255, "mixtral_ext.emu.set_num_regs: regs must be in 0..255, got ", regs);
  if (kernel.empty()) emu::set_num_regs(static_cast<int>(regs));
  else emu::set_kernel_num_regs(kernel, static_cast<int>(regs));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixtral_emu, m) {
  m.def("sm90_selftest(str name, Tensor(a!)[] bufs, int[] args) -> ()", &sm90_selftest);
  m.def("set_num_regs(int regs, str kernel) -> ()", &set_num_regs);
}
