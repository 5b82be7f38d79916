// PTX wrappers usable on every architecture the kernels target (SIMT instructions): non-coherent streamed global
// loads, ex2.approx, 32-bit shared-window loads/stores, %globaltimer. Each wrapper has its CUDA body (inline PTX)
// and, in the CPU emulation build (MIXTRAL_EMU), a C++ body written from the PTX ISA's description of the
// instruction, using only the emulation runtime's primitives (csrc/emu, see EMU_INTERFACE). Only kernel files
// include this; kernel files contain no asm of their own.
#pragma once
#include "../device.cuh"

#include <cstdint>
#ifdef MIXTRAL_EMU
#include <cmath>
#endif

namespace mixtral {

#ifdef MIXTRAL_EMU
// Helpers of the emulated instruction bodies (CPU emulation build only).
namespace emu_ptx {
// A subnormal float becomes a zero of the same sign (the .ftz qualifier, inputs and results alike).
inline float flush_subnormal(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x;
}
// The PTX operand-alignment rule ("addresses must be naturally aligned to the access size"), as a kernel-usage
// error instead of the hardware's misaligned-address fault.
inline void require_aligned(uint64_t addr, uint64_t bytes, const char* what) {
  if (addr % bytes != 0) ::emu::fail(what);
}
}  // namespace emu_ptx
#endif

// Shared-window (32-bit) address of a pointer into shared memory, the address form the PTX wrappers take.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ld.global.nc.L1::no_allocate.L2::256B.v4.u32: a 16-byte read-only global load that does not allocate in L1 and
// hints a 256-byte L2 prefetch. volatile: the compiler issues every such load where it is written (see moe_experts_decode.cu).
__device__ __forceinline__ uint4 ld_global_nc_L1_no_allocate_v4_u32(const uint4* ptr) {
  uint4 v;
#ifndef MIXTRAL_EMU
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
#else
  // A 16-byte vector load: the address must be 16-byte aligned. The cache qualifiers change no value; .nc promises
  // the data is not written during the kernel (not checked here).
  emu_ptx::require_aligned(reinterpret_cast<uint64_t>(ptr), 16, "ld.global.nc.v4.u32: address not 16-byte aligned");
  ::emu::gmem_read(ptr, &v, 16, "ld.global.nc.v4.u32");
#endif
  return v;
}

// ex2.approx.ftz.f32: 2^x, approximate; subnormal inputs and results flush to zero; ex2(-inf) = +0.
__device__ __forceinline__ float ex2_approx_ftz_f32(float x) {
  float y;
#ifndef MIXTRAL_EMU
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
#else
  // PTX ISA (ex2): at most 2 ulp from the correctly rounded 2^x over the full input range; -Inf -> +0, +-0 -> 1,
  // +Inf -> +Inf, NaN -> NaN; .ftz flushes subnormal inputs and results to sign-preserving zero.
  const float xf = emu_ptx::flush_subnormal(x);
  if (std::isnan(xf)) {
    y = xf;
  } else if (xf == 0.0f) {
    y = 1.0f;
  } else if (std::isinf(xf)) {
    y = xf > 0 ? xf : 0.0f;
  } else {
    const float exact = static_cast<float>(std::exp2(static_cast<double>(xf)));  // correctly rounded in practice
    y = std::isfinite(exact) && exact != 0.0f ? ::emu::approx(exact, 2.0f, "ex2.approx.ftz.f32") : exact;
    y = emu_ptx::flush_subnormal(y);
  }
#endif
  return y;
}

// st.shared.b32 [addr], v (addr: shared-window address).
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
#ifndef MIXTRAL_EMU
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
#else
  emu_ptx::require_aligned(addr, 4, "st.shared.b32: address not 4-byte aligned");
  ::emu::smem_write(addr, &v, 4, "st.shared.b32");
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
  emu_ptx::require_aligned(addr, 16, "ld.shared.v4.b32: address not 16-byte aligned");
  ::emu::smem_read(addr, &v, 16, "ld.shared.v4.b32");
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
