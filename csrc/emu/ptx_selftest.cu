// Known-answer kernels for the emulated PTX wrappers the kernels use (csrc/kernels/arch/{common,sm80}.cuh), through
// the real emulation build but independent of the project's kernels (tests/test_emu_ptx.py). The kernels here only
// move registers in and out: every fragment / layout fact is built and checked on the Python side from the PTX ISA,
// so a wrong layout in a wrapper cannot be mirrored by a wrong layout here.
#include "arch/common.cuh"
#include "arch/sm80.cuh"
#include "emu/emu_host.h"

#include <string>

namespace {

using mixtral::smem_u32;

// One warp, one mma.sync.m16n8k16 (fp32 accumulate): lane l passes a[l][0..3], b[l][0..1] (.b32 registers holding two
// 16-bit elements each) and c[l][0..3]; d[l][0..3] receives its accumulator fragment. arg 0: bf16, 1: fp16.
__global__ void mma_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d, int arg) {
  const int l = threadIdx.x;
  const uint32_t af[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
  float acc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
  if (arg == 0) mixtral::mma_m16n8k16_row_col_f32_bf16_bf16_f32(acc, af, b[2 * l], b[2 * l + 1]);
  else mixtral::mma_m16n8k16_row_col_f32_f16_f16_f32(acc, af, b[2 * l], b[2 * l + 1]);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = acc[i];
}

// One warp: pool [32 rows][8] 16-bit elements is copied to shared memory; lane l passes the address of pool row
// rows[l] to ldmatrix .x4 (arg 0) or .x4.trans (arg 1); out[l][0..3] receives its four registers.
__global__ void ldmatrix_kernel(const uint32_t* pool, const int* rows, uint32_t* out, int arg) {
  MX_SHARED_ALIGNED(16, uint32_t[32][4], s);
  const int l = threadIdx.x;
  for (int i = 0; i < 4; ++i) s[l][i] = pool[4 * l + i];
  __syncthreads();
  const uint32_t addr = smem_u32(&s[rows[l]][0]);
  uint32_t r[4];
  if (arg == 0) mixtral::ldmatrix_x4(addr, r[0], r[1], r[2], r[3]);
  else mixtral::ldmatrix_x4_trans(addr, r[0], r[1], r[2], r[3]);
  for (int i = 0; i < 4; ++i) out[4 * l + i] = r[i];
}

// One warp, cp.async through the wrappers: lane l copies x[l][0..11] (three 16-byte chunks) into its shared row as
// three committed groups; the third reads only `arg` bytes (src-size, the rest zero-filled). It reads its row back
// before any wait, after wait_group 2, 1 and 0: out[4][32][12].
__global__ void cp_async_kernel(const float* x, float* out, int arg) {
  MX_SHARED_ALIGNED(16, float[32][12], s);
  const int l = threadIdx.x;
  for (int g = 0; g < 3; ++g) {
    mixtral::cp_async_cg_16(smem_u32(&s[l][4 * g]), x + 12 * l + 4 * g, g == 2 ? static_cast<uint32_t>(arg) : 16u);
    mixtral::cp_async_commit_group();
  }
  for (int i = 0; i < 12; ++i) out[(0 * 32 + l) * 12 + i] = s[l][i];
  mixtral::cp_async_wait_group<2>();
  for (int i = 0; i < 12; ++i) out[(1 * 32 + l) * 12 + i] = s[l][i];
  mixtral::cp_async_wait_group<1>();
  for (int i = 0; i < 12; ++i) out[(2 * 32 + l) * 12 + i] = s[l][i];
  mixtral::cp_async_wait_group<0>();
  for (int i = 0; i < 12; ++i) out[(3 * 32 + l) * 12 + i] = s[l][i];
}

// out[i] = ex2.approx.ftz.f32(x[i]), i < n.
__global__ void ex2_kernel(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = mixtral::ex2_approx_ftz_f32(x[i]);
}

// ld.global.nc.v4 of x[l] (16 bytes), st.shared.b32 of its four words into a shared row, ld.shared.v4 of the row
// rotated by one lane: out[l] = x[(l + 1) % 32]. x, out: [32][4] uint32.
__global__ void vec_kernel(const uint32_t* x, uint32_t* out) {
  MX_SHARED_ALIGNED(16, uint32_t[32][4], s);
  const int l = threadIdx.x;
  const uint4 v = mixtral::ld_global_nc_L1_no_allocate_v4_u32(reinterpret_cast<const uint4*>(x) + l);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  for (int i = 0; i < 4; ++i) mixtral::st_shared_b32(smem_u32(&s[l][i]), w[i]);
  __syncthreads();
  uint4 r;
  mixtral::ld_shared_v4_b32(smem_u32(&s[(l + 1) % 32][0]), r);
  out[4 * l] = r.x, out[4 * l + 1] = r.y, out[4 * l + 2] = r.z, out[4 * l + 3] = r.w;
}

}  // namespace

namespace emu {

// The PTX wrappers' known-answer kernels: runs `name` ("ptx_*") on the given buffers; false if unknown.
bool run_ptx_selftest(const std::string& name, void* const* b, int n, int64_t arg) {
  const int a = static_cast<int>(arg);
  auto u = [&](int i) { return static_cast<uint32_t*>(b[i]); };
  auto f = [&](int i) { return static_cast<float*>(b[i]); };
  if (name == "ptx_mma" && n == 4) launch(mma_kernel, 1, 32, 0, nullptr, u(0), u(1), f(2), f(3), a);
  else if (name == "ptx_ldmatrix" && n == 3)
    launch(ldmatrix_kernel, 1, 32, 0, nullptr, u(0), static_cast<const int*>(b[1]), u(2), a);
  else if (name == "ptx_cp_async" && n == 2) launch(cp_async_kernel, 1, 32, 0, nullptr, f(0), f(1), a);
  else if (name == "ptx_ex2" && n == 2) launch(ex2_kernel, (a + 127) / 128, 128, 0, nullptr, f(0), f(1), a);
  else if (name == "ptx_vec" && n == 2) launch(vec_kernel, 1, 32, 0, nullptr, u(0), u(1));
  else return false;
  return true;
}

}  // namespace emu
