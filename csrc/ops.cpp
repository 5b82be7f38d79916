// The only torch-facing file: CUDA kernels for the ops whose schemas mixtral_ext/ops.py defines.
//
// Every entry point: named shape / dtype / device / contiguity checks (TORCH_CHECK: the caller's error) -> device
// guard -> current stream -> launch through a torch-free launcher in csrc/kernels -> launch-error check. Nothing
// here synchronises with the host, so every op can be captured in a CUDA graph. Dimension legend as in
// reference.py (T tokens, B sequences, S cache slots, H hidden, I ffn, E experts, k slots, Hq/Hkv heads, D dim).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rms_norm.h"
// @@includes (each op family adds its header here)

namespace {

using mixtral::DType;

DType dtype_tag(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

#define CHECK_CUDA_TENSOR(op, t) \
  TORCH_CHECK((t).is_cuda(), op, ": " #t " must be a CUDA tensor, got device ", (t).device())
#define CHECK_SAME_DEVICE(op, a, b) \
  TORCH_CHECK((a).device() == (b).device(), op, ": " #a " and " #b " are on different devices (", \
              (a).device(), " vs ", (b).device(), ")")
#define CHECK_CONTIGUOUS(op, t) TORCH_CHECK((t).is_contiguous(), op, ": " #t " must be contiguous")
#define CHECK_DTYPE(op, t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), op, ": " #t " must be ", dt, ", got ", (t).scalar_type())
#define CHECK_DIM(op, t, n) TORCH_CHECK((t).dim() == (n), op, ": " #t " must be ", n, "-D, got shape ", (t).sizes())
#define CHECK_LAUNCH(op, err) \
  TORCH_CHECK((err) == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err))

// ---- rms_norm ---------------------------------------------------------------------------------------------------
// x: [T, H] (rows may be strided, H contiguous), weight: [H], residual: [T, H] or None (updated in place).
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps,
                         const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "mixtral_ext::rms_norm";
  CHECK_CUDA_TENSOR(op, x);
  CHECK_SAME_DEVICE(op, x, weight);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got ", x.sizes());
  TORCH_CHECK(x.stride(-1) == 1, op, ": x's last dimension must be contiguous");
  CHECK_DIM(op, weight, 1);
  TORCH_CHECK(weight.size(0) == x.size(-1), op, ": weight has ", weight.size(0), " elements, x's rows have ",
              x.size(-1));
  CHECK_CONTIGUOUS(op, weight);
  CHECK_DTYPE(op, weight, x.scalar_type());
  const int64_t H = x.size(-1);
  // Leading dims are flattened into rows; a 2-D strided view keeps its row stride, anything else must be dense.
  at::Tensor x2 = x.dim() == 2 ? x : x.contiguous().view({-1, H});
  mixtral::RmsNormParams p{};
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    CHECK_SAME_DEVICE(op, x, r);
    CHECK_DTYPE(op, r, x.scalar_type());
    TORCH_CHECK(r.sizes() == x.sizes(), op, ": residual shape ", r.sizes(), " differs from x shape ", x.sizes());
    TORCH_CHECK(r.stride(-1) == 1 && (r.dim() == 2 || r.is_contiguous()), op,
                ": residual must be contiguous (or a 2-D view with contiguous rows)");
    p.residual = r.data_ptr();
    p.residual_stride = r.dim() == 2 ? r.stride(0) : H;
  }
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  p.x = x2.data_ptr();
  p.w = weight.data_ptr();
  p.out = out.data_ptr();
  p.rows = x2.size(0);
  p.hidden = H;
  p.x_stride = x2.stride(0);
  p.eps = static_cast<float>(eps);
  p.dtype = dtype_tag(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  CHECK_LAUNCH(op, mixtral::rms_norm_launch(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// @@bindings (each op family adds its entry points above this line)

}  // namespace

TORCH_LIBRARY_IMPL(mixtral_ext, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  // @@impls (each op family adds its m.impl lines above this line)
}
