// PTX wrappers usable on every architecture the kernels target (SIMT instructions): non-coherent streamed global
// loads, ex2.approx, 32-bit shared-window loads/stores, %globaltimer. Each wrapper has its CUDA body (inline PTX)
// and, in the CPU emulation build (MIXTRAL_EMU), a C++ body written from the PTX ISA's description of the
// instruction, using only the emulation runtime's primitives (csrc/emu, see EMU_INTERFACE). Only kernel files
// include this; kernel files contain no asm of their own.
#pragma once
#include "../device.cuh"

#include <cstdint>

namespace mixtral {

// Shared-window (32-bit) address of a pointer into shared memory, the address form the PTX wrappers take.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ld.global.nc.L1::no_allocate.L2::256B.v4.u32: a 16-byte read-only global load that does not allocate in L1 and
// hints a 256-byte L2 prefetch. volatile: the compiler issues every such load where it is written (see moe_decode).
__device__ __forceinline__ uint4 ld_global_nc_L1_no_allocate_v4_u32(const uint4* ptr) {
  uint4 v;
#ifndef MIXTRAL_EMU
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
#else
  (void)ptr;
  v = uint4{};
  ::emu::fail("ld.global.nc.v4.u32 not emulated yet");
#endif
  return v;
}

// ex2.approx.ftz.f32: 2^x, approximate; subnormal inputs and results flush to zero; ex2(-inf) = +0.
__device__ __forceinline__ float ex2_approx_ftz_f32(float x) {
  float y;
#ifndef MIXTRAL_EMU
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
#else
  (void)x;
  y = 0.f;
  ::emu::fail("ex2.approx.ftz.f32 not emulated yet");
#endif
  return y;
}

// st.shared.b32 [addr], v (addr: shared-window address).
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
#ifndef MIXTRAL_EMU
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
#else
  (void)addr;
  (void)v;
  ::emu::fail("st.shared.b32 not emulated yet");
#endif
}

// ld.shared.v4.b32 {x, y, z, w}, [addr] (addr: 16-byte aligned shared-window address).
__device__ __forceinline__ void ld_shared_v4_b32(uint32_t addr, uint4& v) {
#ifndef MIXTRAL_EMU
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
#else
  (void)addr;
  v = uint4{};
  ::emu::fail("ld.shared.v4.b32 not emulated yet");
#endif
}

// mov.u64 %globaltimer: nanoseconds of GPU time (the kernels' hang watchdogs).
__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
#ifndef MIXTRAL_EMU
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
#else
  t = ::emu::globaltimer_ns();
#endif
  return t;
}

}  // namespace mixtral
