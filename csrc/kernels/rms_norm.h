// rms_norm: out = rmsnorm(x) * w, optionally on residual += x (in place). See rms_norm.cu.
#pragma once
#include "common.h"

namespace mixtral {

struct RmsNormParams {
  const void* x;     // [T, H], row stride x_stride (elements)
  const void* w;     // [H]
  void* residual;    // [T, H] row stride residual_stride, or nullptr; updated in place to residual + x
  void* out;         // [T, H] contiguous
  int64_t tokens;    // T (the leading dims of x flattened)
  int64_t hidden;    // H
  int64_t x_stride;
  int64_t residual_stride;
  float eps;
  DType dtype;       // x, w, residual and out share it
};

cudaError_t rms_norm_launch(const RmsNormParams& p, cudaStream_t stream);

}  // namespace mixtral
