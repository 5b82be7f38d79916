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

#ifdef MIXTRAL_EMU
namespace emu_ptx {

// ldmatrix.sync.aligned.m8n8.xNUM{.trans}.shared.b16 (PTX ISA "ldmatrix"): lanes 8m .. 8m+7 supply the row addresses
// (16 bytes each, 16-byte aligned) of matrix m < NUM; lanes of higher groups are ignored. Lane l receives in r[m]
// matrix m's row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 (lower element in the low half); with .trans the
// matrix is read column-major: elements (row 2 (l % 4), column l / 4) and (row 2 (l % 4) + 1, column l / 4).
// Every lane takes part (.aligned); each reads only the bytes it receives, so reads are attributed to it.
template <int NUM, bool TRANS>
inline void ldmatrix_m8n8_b16(uint32_t addr, uint32_t (&r)[NUM], const char* site) {
  uint32_t rows[32];
  ::emu::warp_exchange(0xffffffffu, addr, rows);
  const unsigned lane = ::emu::lane_id();
  for (int m = 0; m < NUM; ++m) {
    for (int i = 0; i < 8; ++i) require_aligned(rows[8 * m + i], 16, "ldmatrix: row address not 16-byte aligned");
    if (!TRANS) {
      ::emu::smem_read(rows[8 * m + lane / 4] + 4 * (lane % 4), &r[m], 4, site);
    } else {
      uint16_t lo, hi;
      ::emu::smem_read(rows[8 * m + 2 * (lane % 4)] + 2 * (lane / 4), &lo, 2, site);
      ::emu::smem_read(rows[8 * m + 2 * (lane % 4) + 1] + 2 * (lane / 4), &hi, 2, site);
      r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (PTX ISA "Matrix Fragments for mma.m16n8k16 with
// floating point type"), with groupID g = lane >> 2 and threadID_in_group t = lane % 4:
//   A (16 x 16): element a_i (i = 0..7, two per .b32 register, a_{2j} in the low half of register j) is at
//     row g for i in {0, 1, 4, 5}, else g + 8; column 2t + (i & 1), + 8 for i >= 4.
//   B (16 x 8): b_i (i = 0..3, b_{2j} low half of register j) is at row 2t + (i & 1), + 8 for i >= 2; column g.
//   C, D (16 x 8, fp32): c_i at row g for i < 2, else g + 8; column 2t + (i & 1).
// Each lane contributes its registers; each computes its own four outputs from all lanes' fragments. The 16-bit
// products are exact in fp32; they are accumulated in fp32 onto c in k order.
struct MmaAbFrag {
  uint32_t a[4], b[2];
};
template <bool BF16>
inline void mma_m16n8k16_f32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const MmaAbFrag mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  MmaAbFrag all[32];
  ::emu::warp_exchange(0xffffffffu, mine, all);
  auto half = [](uint32_t reg, int hi) { return hi ? reg >> 16 : reg & 0xFFFFu; };
  // The 16-bit inputs to fp32, exactly (the emulation runtime's conversions, as the emulated wgmma uses).
  auto to_f = [](uint32_t h) {
    const auto b = static_cast<uint16_t>(h);
    return BF16 ? ::emu::bf16_bits_to_f32(b) : ::emu::f16_bits_to_f32(b);
  };
  // A(row, k): lane 4 (row % 8) + (k % 8) / 2, element i = 4 (k >= 8) + 2 (row >= 8) + (k & 1).
  auto A = [&](int row, int k) {
    const int i = 4 * (k >= 8) + 2 * (row >= 8) + (k & 1);
    return to_f(half(all[4 * (row % 8) + (k % 8) / 2].a[i / 2], i & 1));
  };
  // B(k, col): lane 4 col + (k % 8) / 2, element i = 2 (k >= 8) + (k & 1).
  auto B = [&](int k, int col) {
    const int i = 2 * (k >= 8) + (k & 1);
    return to_f(half(all[4 * col + (k % 8) / 2].b[i / 2], i & 1));
  };
  const int g = static_cast<int>(::emu::lane_id() >> 2), t = static_cast<int>(::emu::lane_id() & 3);
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
}

}  // namespace emu_ptx
#endif

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: an asynchronous 16-byte global -> shared copy that
// bypasses L1. Only the first src_bytes bytes are read; the rest of the 16 are zero-filled (src_bytes = 0 reads
// nothing, but src must still be a valid address). The data is guaranteed in shared memory only after a
// cp.async.wait_group that covers the copy's group.
__device__ __forceinline__ void cp_async_cg_16(uint32_t dst, const void* src, uint32_t src_bytes) {
#ifndef MIXTRAL_EMU
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#else
  // cp-size 16: both addresses 16-byte aligned; src-size at most cp-size. The runtime queues the copy in the
  // thread's current group; the bytes land in shared memory only when a wait_group covering the group runs.
  emu_ptx::require_aligned(dst, 16, "cp.async.cg: shared address not 16-byte aligned");
  emu_ptx::require_aligned(reinterpret_cast<uint64_t>(src), 16, "cp.async.cg: global address not 16-byte aligned");
  if (src_bytes > 16) ::emu::fail("cp.async.cg: src-size larger than cp-size 16");
  ::emu::async_copy_global_to_shared(dst, src, 16, src_bytes, "cp.async.cg.shared.global");
#endif
}

// cp.async.commit_group: closes the calling thread's current group of cp.async copies.
__device__ __forceinline__ void cp_async_commit_group() {
#ifndef MIXTRAL_EMU
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  ::emu::async_commit_group();
#endif
}

// cp.async.wait_group N: waits until at most N of the calling thread's committed groups are pending.
template <int N> __device__ __forceinline__ void cp_async_wait_group() {
#ifndef MIXTRAL_EMU
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  static_assert(N >= 0, "cp.async.wait_group: N is a non-negative constant");
  ::emu::async_wait_group(N);
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
  uint32_t r[4];
  emu_ptx::ldmatrix_m8n8_b16<4, false>(addr, r, "ldmatrix.x4");
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
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
  uint32_t r[4];
  emu_ptx::ldmatrix_m8n8_b16<4, true>(addr, r, "ldmatrix.x4.trans");
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#endif
}

// ldmatrix .x1 / .x2 (and .trans): as .x4 with one or two matrices; only lanes 0-7 (0-15) supply addresses.
__device__ __forceinline__ void ldmatrix_x1(uint32_t addr, uint32_t& r0) {
#ifndef MIXTRAL_EMU
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r0) : "r"(addr) : "memory");
#else
  uint32_t r[1];
  emu_ptx::ldmatrix_m8n8_b16<1, false>(addr, r, "ldmatrix.x1");
  r0 = r[0];
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t addr, uint32_t& r0) {
#ifndef MIXTRAL_EMU
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r0) : "r"(addr) : "memory");
#else
  uint32_t r[1];
  emu_ptx::ldmatrix_m8n8_b16<1, true>(addr, r, "ldmatrix.x1.trans");
  r0 = r[0];
#endif
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
#ifndef MIXTRAL_EMU
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
#else
  uint32_t r[2];
  emu_ptx::ldmatrix_m8n8_b16<2, false>(addr, r, "ldmatrix.x2");
  r0 = r[0], r1 = r[1];
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t addr, uint32_t& r0, uint32_t& r1) {
#ifndef MIXTRAL_EMU
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
#else
  uint32_t r[2];
  emu_ptx::ldmatrix_m8n8_b16<2, true>(addr, r, "ldmatrix.x2.trans");
  r0 = r[0], r1 = r[1];
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
  emu_ptx::mma_m16n8k16_f32<true>(d, a, b0, b1);
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
  emu_ptx::mma_m16n8k16_f32<false>(d, a, b0, b1);
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
