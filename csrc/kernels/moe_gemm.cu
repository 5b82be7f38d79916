// Placeholder until the grouped GEMM lands: reports "not supported" so moe_experts uses its decode kernels.
#include "moe_gemm.h"

namespace mixtral {

cudaError_t moe_grouped_gemm_launch(const MoeGroupedGemmParams&, cudaStream_t) { return cudaErrorNotSupported; }

}  // namespace mixtral
