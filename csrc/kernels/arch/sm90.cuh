// PTX wrappers of the Hopper (sm_90a) instructions the kernels use: mbarriers, TMA (cp.async.bulk.tensor), the
// wgmma group protocol and the wgmma shapes the kernels issue, shared-memory matrix descriptors for the 128-byte
// swizzle, register re-allocation (setmaxnreg), named barriers, fences, and the register pins that order wgmma's
// asynchronous accumulator accesses. Each wrapper has its CUDA body (inline PTX) and, in the CPU emulation build
// (MIXTRAL_EMU), an emulated body calling the emulation runtime's Hopper primitives (csrc/emu/sm90.h, written from the
// PTX ISA; sm90.cpp says what is modelled and reported).
//
// MIXTRAL_SM90A is defined in the sm_90a device pass and in the emulation build: the other CUDA passes of the same
// file must not see wgmma or setmaxnreg, so kernels wrap their sm_90a bodies in #ifdef MIXTRAL_SM90A. Only kernel
// files include this; it also provides CUtensorMap and the driver types of its host-side encoding.
#pragma once
#include "../device.cuh"
#include "common.cuh"

#ifndef MIXTRAL_EMU
#include <cuda.h>  // CUtensorMap, cuTensorMapEncodeTiled's types
#else
#include "emu/sm90.h"
#endif

#include <cstdint>
#include <type_traits>

#if defined(MIXTRAL_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define MIXTRAL_SM90A 1
#endif

#ifndef MIXTRAL_EMU
// wgmma operand lists for an fp32 accumulator array d: MIXTRAL_WGMMA_Dn = "+f"(d[0]) .. "+f"(d[n-1]), and
// MIXTRAL_WGMMA_Rn = the matching "%0, .. %(n-1)" inside the instruction's braces; the operands after them are
// numbered from %n on.
#define MIXTRAL_WGMMA_D32                                                                                          \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),        \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),         \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),        \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define MIXTRAL_WGMMA_D64                                                                                          \
  MIXTRAL_WGMMA_D32, "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]),      \
      "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]),        \
      "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),        \
      "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),        \
      "+f"(d[63])
#define MIXTRAL_WGMMA_D128                                                                                         \
  MIXTRAL_WGMMA_D64, "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]),      \
      "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]),        \
      "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]),        \
      "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]),        \
      "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]),     \
      "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),              \
      "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]),              \
      "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]),              \
      "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define MIXTRAL_WGMMA_R32                                                                                          \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                         \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define MIXTRAL_WGMMA_R64                                                                                          \
  MIXTRAL_WGMMA_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "             \
                    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define MIXTRAL_WGMMA_R128                                                                                         \
  MIXTRAL_WGMMA_R64 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "             \
                    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "               \
                    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "   \
                    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#endif  // !MIXTRAL_EMU

#ifdef MIXTRAL_SM90A
namespace mixtral {
namespace sm90 {

// mbarriers (shared::cta addresses). A fresh barrier is in phase 0, and parity 1 (the phase "before" it) counts as
// completed, which lets a producer's first pass over a ring go through.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#ifndef MIXTRAL_EMU
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#else
  ::emu::sm90::mbar_init(bar, count);
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#ifndef MIXTRAL_EMU
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#else
  ::emu::sm90::mbar_arrive(bar, 0);
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#ifndef MIXTRAL_EMU
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#else
  if (bytes == 0) ::emu::fail("mbarrier.arrive.expect_tx with 0 bytes (use mbarrier.arrive)");
  ::emu::sm90::mbar_arrive(bar, bytes);
#endif
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
#ifndef MIXTRAL_EMU
  uint32_t done;
  asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
               " selp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  return done != 0;
#else
  return ::emu::sm90::mbar_try_wait_parity(bar, parity);
#endif
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// fence.mbarrier_init.release.cluster: makes the mbarrier.init writes visible (to the async proxy, TMA) before use.
__device__ __forceinline__ void fence_mbarrier_init_release_cluster() {
#ifndef MIXTRAL_EMU
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  ::emu::sm90::fence_mbarrier_init();
#endif
}

// Nanoseconds a legitimate barrier wait never reaches: a wait pending that long is a synchronisation bug, and the
// kernels' watchdogs (globaltimer_ns, arch/common.cuh) trap, which turns the hang into a reported launch error.
constexpr uint64_t kWatchdogNs = 10000000000ull;

// Generic-proxy writes to shared memory (st.shared, cp.async) become visible to the async proxy (wgmma, TMA).
__device__ __forceinline__ void fence_proxy_async() {
#ifndef MIXTRAL_EMU
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  ::emu::sm90::fence_proxy_async();
#endif
}

// prefetch.tensormap: brings a (kernel-parameter) tensor map into the cache ahead of its first TMA use.
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
#ifndef MIXTRAL_EMU
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#else
  (void)map;  // a hint only: nothing to emulate
#endif
}

// cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes: TMA load of the box at (inner
// coordinate x, outer coordinate y) of `map` into shared memory at dst; completion is signalled on mbarrier `bar`
// as transaction bytes.
__device__ __forceinline__ void cp_async_bulk_tensor_2d_global_to_shared(uint32_t dst, const CUtensorMap* map, int x,
                                                                         int y, uint32_t bar) {
#ifndef MIXTRAL_EMU
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
#else
  const int coords[2] = {x, y};
  ::emu::sm90::tma_load(dst, map, coords, 2, bar);
#endif
}

#ifdef MIXTRAL_EMU
template <typename T> constexpr ::emu::sm90::WgmmaType wgmma_type() {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "wgmma: bf16 or fp16");
  return std::is_same_v<T, __nv_bfloat16> ? ::emu::sm90::WgmmaType::kBF16 : ::emu::sm90::WgmmaType::kF16;
}
#endif

// The wgmma group protocol: fence before a batch whose register operands ordinary code wrote; commit closes the
// batch into a group; wait_group N waits until at most N groups are pending (accumulators are valid only then).
__device__ __forceinline__ void wgmma_fence() {
#ifndef MIXTRAL_EMU
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  ::emu::sm90::wgmma_fence();
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifndef MIXTRAL_EMU
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  ::emu::sm90::wgmma_commit();
#endif
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
#ifndef MIXTRAL_EMU
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  ::emu::sm90::wgmma_wait(N);
#endif
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.T.T, both operands from shared memory (descriptors da, db), both K-major
// (imm-trans-a = imm-trans-b = 0), scale-a = scale-b = 1: d (64 x N, fp32, the warpgroup's accumulator fragment,
// N / 2 registers per thread) = A (64 x 16) * B (N x 16)^T + (scale_d != 0 ? d : 0). T = __nv_bfloat16 or __half.
#ifndef MIXTRAL_EMU
#define MIXTRAL_WGMMA_SS(N, TY, R, D, P, DA, DB)                                                 \
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %" P ", 0;\n"                                 \
               " wgmma.mma_async.sync.aligned.m64n" N "k16.f32." TY "." TY " {" R "}, %" DA ", %" DB \
               ", p, 1, 1, 0, 0;\n}\n"                                                             \
               : D                                                                                  \
               : "l"(da), "l"(db), "r"(scale_d)                                                     \
               : "memory")
#endif
template <typename T>
__device__ __forceinline__ void wgmma_m64n256k16_f32_ss(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
#ifndef MIXTRAL_EMU
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MIXTRAL_WGMMA_SS("256", "bf16", MIXTRAL_WGMMA_R128, MIXTRAL_WGMMA_D128, "130", "128", "129");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma: bf16 or fp16");
    MIXTRAL_WGMMA_SS("256", "f16", MIXTRAL_WGMMA_R128, MIXTRAL_WGMMA_D128, "130", "128", "129");
  }
#else
  ::emu::sm90::wgmma_issue(d, 256, wgmma_type<T>(), da, nullptr, db, scale_d != 0, 1, 1, 0, 0);
#endif
}
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16_f32_ss(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
#ifndef MIXTRAL_EMU
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MIXTRAL_WGMMA_SS("128", "bf16", MIXTRAL_WGMMA_R64, MIXTRAL_WGMMA_D64, "66", "64", "65");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma: bf16 or fp16");
    MIXTRAL_WGMMA_SS("128", "f16", MIXTRAL_WGMMA_R64, MIXTRAL_WGMMA_D64, "66", "64", "65");
  }
#else
  ::emu::sm90::wgmma_issue(d, 128, wgmma_type<T>(), da, nullptr, db, scale_d != 0, 1, 1, 0, 0);
#endif
}
#ifndef MIXTRAL_EMU
#undef MIXTRAL_WGMMA_SS
#endif

// wgmma.mma_async.sync.aligned.m64n64k16.f32.T.T with A from registers (the mma.m16n8k16 A fragment on each warp's
// 16 rows, 4 x .b32 per thread) and B from shared memory (descriptor db) N-major (imm-trans-b = 1), scale-d = 1:
// d (64 x 64, fp32, 32 registers per thread) += A (64 x 16) * B (16 x 64).
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16_f32_rs_transb(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
#ifndef MIXTRAL_EMU
#define MIXTRAL_WGMMA_RS(TY)                                                                         \
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"                                      \
               " wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" MIXTRAL_WGMMA_R32 "}, " \
               "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                         \
               : MIXTRAL_WGMMA_D32                                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MIXTRAL_WGMMA_RS("bf16");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma: bf16 or fp16");
    MIXTRAL_WGMMA_RS("f16");
  }
#undef MIXTRAL_WGMMA_RS
#else
  ::emu::sm90::wgmma_issue(d, 64, wgmma_type<T>(), 0, a, db, true, 1, 1, 0, 1);
#endif
}

// Pins registers in program order relative to the surrounding asm statements (accumulator zeroing before the first
// wgmma, reads after wgmma.wait_group): the compiler sees no dependency between an asynchronous wgmma and ordinary
// instructions on its operands. The emulation executes in program order: nothing to pin.
template <int N> __device__ __forceinline__ void keep_regs(float (&d)[N]) {
#ifndef MIXTRAL_EMU
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}
template <int N> __device__ __forceinline__ void keep_regs(uint32_t (&d)[N]) {
#ifndef MIXTRAL_EMU
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
#else
  (void)d;
#endif
}

// setmaxnreg.{inc,dec}.sync.aligned.u32 R: the warpgroup's per-thread register count becomes R (inc waits until the
// CTA's pool can supply the registers).
template <int R> __device__ __forceinline__ void setmaxnreg_inc() {
#ifndef MIXTRAL_EMU
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
#else
  ::emu::sm90::setmaxnreg(true, R);
#endif
}
template <int R> __device__ __forceinline__ void setmaxnreg_dec() {
#ifndef MIXTRAL_EMU
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
#else
  ::emu::sm90::setmaxnreg(false, R);
#endif
}

// Named barriers: bar.sync id, kThreads waits until kThreads threads (multiples of 32, the calling warp included)
// have arrived at barrier id; bar.arrive id, kThreads arrives without waiting.
template <int kThreads> __device__ __forceinline__ void bar_sync(uint32_t id) {
#ifndef MIXTRAL_EMU
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
#else
  ::emu::sm90::bar_sync(id, kThreads, true);
#endif
}
template <int kThreads> __device__ __forceinline__ void bar_arrive(uint32_t id) {
#ifndef MIXTRAL_EMU
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
#else
  ::emu::sm90::bar_sync(id, kThreads, false);
#endif
}

// Shared-memory matrix descriptors for 128-byte-swizzled tiles (1024-byte aligned atoms, base offset 0; the
// kernels' headers give the layouts): [0,14) start address >> 4, [16,30) LBO >> 4, [32,46) SBO >> 4, [62,64) = 1.
// K-major: SBO = 1024 (next 8 rows), LBO unused for swizzled K-major and set to 1.
__device__ __forceinline__ uint64_t desc_sw128_kmajor(uint32_t addr) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}
// N-major, for operands one swizzle atom (64 elements) wide in N: the K-direction atom stride (1024) in both LBO and
// SBO (see attention_prefill_sm90.cu).
__device__ __forceinline__ uint64_t desc_sw128_nmajor(uint32_t addr) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (uint64_t{1024 >> 4} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

}  // namespace sm90
}  // namespace mixtral
#endif  // MIXTRAL_SM90A
