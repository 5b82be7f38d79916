// PTX wrappers of the sm_80 (Ampere) instructions the kernels use: cp.async with commit/wait groups, ldmatrix and
// mma.sync m16n8k16 with fp32 accumulators. Each wrapper has its CUDA body (inline PTX) and, in the CPU emulation
// build (MIXTRAL_EMU), a C++ body written from the PTX ISA's description of the instruction, using only the
// emulation runtime's primitives (csrc/emu, see EMU_INTERFACE). Only kernel files include this. All addresses of
// shared memory are shared-window (32-bit) addresses, see smem_u32.
#pragma once
#include "../device.cuh"
#include "common.cuh"

#include <cstdint>
#include <type_traits>

namespace mixtral {

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: an asynchronous 16-byte global -> shared copy that
// bypasses L1. Only the first src_bytes bytes are read; the rest of the 16 are zero-filled (src_bytes = 0 reads
// nothing, but src must still be a valid address). The data is guaranteed in shared memory only after a
// cp.async.wait_group that covers the copy's group.
__device__ __forceinline__ void cp_async_cg_16(uint32_t dst, const void* src, uint32_t src_bytes) {
#ifndef MIXTRAL_EMU
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#else
  (void)dst;
  (void)src;
  (void)src_bytes;
  ::emu::fail("cp.async.cg.shared.global not emulated yet");
#endif
}

// cp.async.commit_group: closes the calling thread's current group of cp.async copies.
__device__ __forceinline__ void cp_async_commit_group() {
#ifndef MIXTRAL_EMU
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  ::emu::fail("cp.async.commit_group not emulated yet");
#endif
}

// cp.async.wait_group N: waits until at most N of the calling thread's committed groups are pending.
template <int N> __device__ __forceinline__ void cp_async_wait_group() {
#ifndef MIXTRAL_EMU
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  ::emu::fail("cp.async.wait_group not emulated yet");
#endif
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8x8 matrices of 16-bit elements. Lanes 8i .. 8i+7 supply the
// addresses of matrix i's 8 rows (16 bytes each); register i of lane l receives matrix i's row l / 4, elements
// 2 (l % 4) and 2 (l % 4) + 1 (the lower-numbered element in the low 16 bits). "memory": it reads what cp.async and
// ordinary stores wrote, so it must stay after the wait and barrier that publish them.
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
#ifndef MIXTRAL_EMU
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
#else
  (void)addr;
  r0 = r1 = r2 = r3 = 0;
  ::emu::fail("ldmatrix.x4 not emulated yet");
#endif
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: as ldmatrix_x4, each matrix transposed: register i of lane l
// receives matrix i's elements (row 2 (l % 4), column l / 4) and (row 2 (l % 4) + 1, column l / 4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3) {
#ifndef MIXTRAL_EMU
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
#else
  (void)addr;
  r0 = r1 = r2 = r3 = 0;
  ::emu::fail("ldmatrix.x4.trans not emulated yet");
#endif
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: D (16x8, fp32) = A (16x16) * B (16x8) + D, in
// place. Fragments (g = lane / 4, t = lane % 4; two 16-bit elements per .b32 register, the lower-numbered in the
// low half): a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..), a[2] = A(g, 2t+8..), a[3] = A(g+8, 2t+8..);
// b0 = B(2t..2t+1, g), b1 = B(2t+8..2t+9, g); d[0..1] = D(g, 2t..2t+1), d[2..3] = D(g+8, 2t..2t+1).
// Not volatile: a pure function of its register operands.
__device__ __forceinline__ void mma_m16n8k16_row_col_f32_bf16_bf16_f32(float (&d)[4], const uint32_t (&a)[4],
                                                                      uint32_t b0, uint32_t b1) {
#ifndef MIXTRAL_EMU
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  (void)d;
  (void)a;
  (void)b0;
  (void)b1;
  ::emu::fail("mma.sync.m16n8k16.f32.bf16 not emulated yet");
#endif
}
__device__ __forceinline__ void mma_m16n8k16_row_col_f32_f16_f16_f32(float (&d)[4], const uint32_t (&a)[4],
                                                                    uint32_t b0, uint32_t b1) {
#ifndef MIXTRAL_EMU
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  (void)d;
  (void)a;
  (void)b0;
  (void)b1;
  ::emu::fail("mma.sync.m16n8k16.f32.f16 not emulated yet");
#endif
}

// The mma above for element type T (__nv_bfloat16 or __half).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16_f32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    mma_m16n8k16_row_col_f32_bf16_bf16_f32(d, a, b0, b1);
  } else {
    static_assert(std::is_same_v<T, __half>, "mma.m16n8k16: bf16 or fp16");
    mma_m16n8k16_row_col_f32_f16_f16_f32(d, a, b0, b1);
  }
}

}  // namespace mixtral
