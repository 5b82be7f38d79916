// The CUDA C++ surface the kernels use, for the emulation build (-DMIXTRAL_EMU): the kernels' exact source compiles
// with the host C++ compiler and runs on the CPU, one CTA after another, each CUDA thread a cooperative fiber that
// yields only at synchronisation points (csrc/emu/runtime.cpp). Included by csrc/kernels/device.cuh instead of the
// CUDA headers; never by a torch-facing file (the binding talks to the runtime through emu_host.h).
//
// What this header promises, and how it finds bugs instead of hiding them:
// - threadIdx / blockIdx / blockDim / gridDim are the current fiber's; `__CUDA_ARCH__` is not defined.
// - __syncthreads, __syncwarp, shuffles, votes and atomics are macros that pass __FILE__/__LINE__, so deadlock, race
//   and missing-lane reports name the source line of the call.
// - Shared memory (MX_SHARED*, MX_DYNAMIC_SHARED) lives in one arena per CTA, filled with 0xFF bytes (NaN as
//   float / bf16 / fp16) at every CTA start.
// - Plain loads and stores of kernel code are seen through -fsanitize=thread instrumentation (the runtime defines the
//   __tsan_* hooks): shared accesses feed the race detector, global ones are checked against the launch's buffers.
// - Approximate math (rsqrtf, __expf, __fdividef, expf ...) is moved within its documented worst-case error
//   (emu::approx), so a kernel that passes here does not rely on more accuracy than the hardware promises.
// - bf16 / fp16 conversions round to nearest even, with the specials (NaN, inf, subnormals) as cuda_bf16.h /
//   cuda_fp16.h define them.
#pragma once
#ifndef MIXTRAL_EMU
#error "csrc/emu/cuda_emu.h is the emulation build's CUDA stand-in: compile with -DMIXTRAL_EMU"
#endif

// MIXTRAL_EMU_HOST_ONLY (the binding, csrc/emu/emu_ops.cpp, which also includes torch): only the CUDA runtime and
// driver stand-ins the launchers' headers name (cudaError_t, cudaStream_t, ...), none of the device-side macros.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA runtime stand-ins (what the launchers call) -----------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
  size_t constSizeBytes = 0;
  size_t localSizeBytes = 0;
  int maxThreadsPerBlock = 1024;
  int numRegs = 0;
  int ptxVersion = 0;
  int binaryVersion = 0;
  int cacheModeCA = 0;
  int maxDynamicSharedSizeBytes = 0;
  int preferredShmemCarveout = -1;
};
enum cudaDriverEntryPointQueryResult : int {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2,
};
enum : unsigned long long { cudaEnableDefault = 0 };

namespace emu {
cudaError_t get_last_error(bool clear);
const char* error_string(cudaError_t e);
cudaError_t func_set_attribute(const void* f, int attr, int value);
cudaError_t func_get_attributes(cudaFuncAttributes* a, const void* f);
cudaError_t device_get_attribute(int* v, int attr, int device);
cudaError_t occupancy(int* n, const void* f, int threads, size_t smem);
cudaError_t get_driver_entry_point(const char* symbol, void** fn);
}  // namespace emu
inline cudaError_t cudaGetLastError() { return ::emu::get_last_error(true); }
inline cudaError_t cudaPeekAtLastError() { return ::emu::get_last_error(false); }
inline const char* cudaGetErrorString(cudaError_t e) { return ::emu::error_string(e); }
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
  return ::emu::func_set_attribute(reinterpret_cast<const void*>(f), attr, value);
}
template <class F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F* f) {
  return ::emu::func_get_attributes(a, reinterpret_cast<const void*>(f));
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int device) {
  return ::emu::device_get_attribute(v, attr, device);
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
template <class F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F* f, int threads, size_t smem) {
  return ::emu::occupancy(n, reinterpret_cast<const void*>(f), threads, smem);
}
inline cudaError_t cudaGetDriverEntryPoint(const char* symbol, void** fn, unsigned long long,
                                           cudaDriverEntryPointQueryResult* q = nullptr) {
  const cudaError_t e = ::emu::get_driver_entry_point(symbol, fn);
  if (q) *q = e == cudaSuccess ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return e;
}
inline cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned, unsigned long long,
                                                    cudaDriverEntryPointQueryResult* q = nullptr) {
  return cudaGetDriverEntryPoint(symbol, fn, 0, q);
}

// ---- driver types of the TMA tensor-map encoding (cuda.h; the values are cuda.h's) --------------------------------
using cuuint32_t = uint32_t;
using cuuint64_t = uint64_t;
enum CUresult : int { CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1, CUDA_ERROR_NOT_SUPPORTED = 801 };
struct alignas(64) CUtensorMap {
  unsigned long long opaque[16];
};
enum CUtensorMapDataType : int {
  CU_TENSOR_MAP_DATA_TYPE_UINT8 = 0, CU_TENSOR_MAP_DATA_TYPE_UINT16, CU_TENSOR_MAP_DATA_TYPE_UINT32,
  CU_TENSOR_MAP_DATA_TYPE_INT32, CU_TENSOR_MAP_DATA_TYPE_UINT64, CU_TENSOR_MAP_DATA_TYPE_INT64,
  CU_TENSOR_MAP_DATA_TYPE_FLOAT16, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, CU_TENSOR_MAP_DATA_TYPE_FLOAT64,
  CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ, CU_TENSOR_MAP_DATA_TYPE_TFLOAT32,
  CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ
};
enum CUtensorMapInterleave : int {
  CU_TENSOR_MAP_INTERLEAVE_NONE = 0, CU_TENSOR_MAP_INTERLEAVE_16B, CU_TENSOR_MAP_INTERLEAVE_32B
};
enum CUtensorMapSwizzle : int {
  CU_TENSOR_MAP_SWIZZLE_NONE = 0, CU_TENSOR_MAP_SWIZZLE_32B, CU_TENSOR_MAP_SWIZZLE_64B, CU_TENSOR_MAP_SWIZZLE_128B
};
enum CUtensorMapL2promotion : int {
  CU_TENSOR_MAP_L2_PROMOTION_NONE = 0, CU_TENSOR_MAP_L2_PROMOTION_L2_64B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
  CU_TENSOR_MAP_L2_PROMOTION_L2_256B
};
enum CUtensorMapFloatOOBfill : int {
  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0, CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA
};

#ifndef MIXTRAL_EMU_HOST_ONLY  // the torch binding includes the kernels' headers with only the part above

// ---- keywords ---------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
// always_inline as in CUDA: the arch/ wrappers then sit inside the kernel functions, so a report's inline chain
// names the kernel line that used the instruction.
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
#define __constant__ const
#define __grid_constant__
#define CUDART_VERSION 13000

// ---- vector and index types -------------------------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return {x, y, z}; }
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(4) ushort2 { unsigned short x, y; };
struct alignas(8) ushort4 { unsigned short x, y, z, w; };
struct alignas(16) longlong2 { long long x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline ushort2 make_ushort2(unsigned short x, unsigned short y) { return {x, y}; }
constexpr int warpSize = 32;

namespace emu {
// The current fiber's indices; the scheduler rewrites them at every switch (runtime.cpp).
extern uint3 g_threadIdx, g_blockIdx;
extern dim3 g_blockDim, g_gridDim;
}  // namespace emu
#define threadIdx (::emu::g_threadIdx)
#define blockIdx (::emu::g_blockIdx)
#define blockDim (::emu::g_blockDim)
#define gridDim (::emu::g_gridDim)

// ---- runtime primitives (EMU_INTERFACE.md; the arch/ wrappers' emulated bodies use only these) -------------------
namespace emu {
unsigned lane_id();
unsigned warp_id();
// Warp rendezvous of the lanes in `mask` (same call sequence); `all` receives every lane's bytes.
void warp_exchange_bytes(unsigned mask, const void* mine, size_t bytes, void* all, const char* what, const char* file,
                         int line);
// The same, each lane receiving only lane src's bytes (0xFF bytes if src is not in the mask): the shuffles.
void warp_shuffle_bytes(unsigned mask, const void* mine, size_t bytes, void* out, int src, const char* what,
                        const char* file, int line);
template <class T>
void warp_exchange(unsigned mask, const T& mine, T (&all)[32]) {
  static_assert(std::is_trivially_copyable_v<T>, "warp_exchange moves bytes");
  warp_exchange_bytes(mask, &mine, sizeof(T), all, "warp_exchange", __builtin_FILE(), __builtin_LINE());
}
void smem_read(uint32_t saddr, void* dst, size_t bytes, const char* site);
void smem_write(uint32_t saddr, const void* src, size_t bytes, const char* site);
void gmem_read(const void* gaddr, void* dst, size_t bytes, const char* site);
void gmem_write(void* gaddr, const void* src, size_t bytes, const char* site);
void async_copy_global_to_shared(uint32_t dst_saddr, const void* src, size_t bytes, size_t src_bytes,
                                 const char* site);
void async_commit_group();
void async_wait_group(int allowed_pending);
float approx(float exact, float ulps, const char* what);
// The same from a double-precision value of the exact result: the answer is within `ulps` of that value itself (what
// the header's math functions use; approx() takes its float argument as the exact value).
float approx_exact(double exact, float ulps, const char* what);
uint64_t globaltimer_ns();
[[noreturn]] void fail(const char* what);

// Used by the macros below.
void syncthreads(const char* file, int line);
void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu);
unsigned activemask();
void threadfence();
[[noreturn]] void trap(const char* file, int line);
void* dynamic_shared(size_t align);
void* shared_object(const void* key, size_t bytes, size_t align, const char* file, int line);
uint32_t cvta_generic_to_shared(const void* p);
// Atomics: the read-modify-write runs inside the runtime (not instrumented), recorded as an atomic access.
enum class AtomicOp : int { kAdd, kMax, kMin, kExch, kCas, kOr, kAnd, kXor, kInc };
enum class AtomicType : int { kI32, kU32, kI64, kU64, kF32, kF64 };
uint64_t atomic_rmw(void* addr, AtomicType type, AtomicOp op, uint64_t operand, uint64_t compare, const char* file,
                    int line);

template <class T> constexpr AtomicType atomic_type() {
  if constexpr (std::is_same_v<T, float>) return AtomicType::kF32;
  else if constexpr (std::is_same_v<T, double>) return AtomicType::kF64;
  else if constexpr (std::is_integral_v<T> && sizeof(T) == 4) return std::is_signed_v<T> ? AtomicType::kI32
                                                                                          : AtomicType::kU32;
  else {
    static_assert(std::is_integral_v<T> && sizeof(T) == 8, "atomics on 4- and 8-byte integers, float and double");
    return std::is_signed_v<T> ? AtomicType::kI64 : AtomicType::kU64;
  }
}
template <class T> inline uint64_t to_bits64(T v) {
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T> inline T from_bits64(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
template <class T, class U>
inline T atomic(const char* file, int line, AtomicOp op, T* addr, U operand, T compare = T()) {
  return from_bits64<T>(atomic_rmw(addr, atomic_type<T>(), op, to_bits64<T>(static_cast<T>(operand)),
                                   to_bits64<T>(compare), file, line));
}

// Kernel launch (mixtral::launch forwards here): the arguments are converted to the kernel's parameter types once,
// as a CUDA launch does, and every thread of every CTA calls the kernel with its own copy.
struct LaunchBody {
  void (*run)(const void* ctx);
  const void* ctx;
};
void launch_impl(const void* kernel, dim3 grid, dim3 block, size_t smem, void* stream, LaunchBody body);
template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, void* stream, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch: argument count differs from the kernel's");
  using Tuple = std::tuple<std::decay_t<KArgs>...>;
  struct Ctx {
    void (*k)(KArgs...);
    Tuple params;
  };
  const Ctx ctx{kernel, Tuple(std::forward<Args>(args)...)};
  launch_impl(reinterpret_cast<const void*>(kernel), grid, block, smem, stream,
              LaunchBody{[](const void* c) {
                           const Ctx* x = static_cast<const Ctx*>(c);
                           Tuple mine = x->params;  // this thread's copy of the parameters
                           std::apply(x->k, std::move(mine));
                         },
                         &ctx});
}

template <class T> using mx_type = T;
}  // namespace emu

// The kernels' one launch helper (device.cuh documents it; its CUDA definition is `kernel<<<...>>>(args...)`).
namespace mixtral {
template <class... KArgs, class... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, void* stream, Args&&... args) {
  ::emu::launch(kernel, grid, block, smem_bytes, stream, std::forward<Args>(args)...);
}
}  // namespace mixtral

// ---- shared memory ----------------------------------------------------------------------------------------------
// The static local key is unique per declaration and per template instantiation: all threads of a CTA get the same
// object, allocated on first use from the CTA's arena (0xFF bytes, never constructed: shared objects are PODs).
#define MX_SHARED_ALIGNED(align, type, name)                                                                    \
  static const char name##_emu_key = 0;                                                                         \
  ::emu::mx_type<type>& name = *static_cast<::emu::mx_type<type>*>(::emu::shared_object(                       \
      &name##_emu_key, sizeof(::emu::mx_type<type>),                                                            \
      (align) > alignof(::emu::mx_type<type>) ? (align) : alignof(::emu::mx_type<type>), __FILE__, __LINE__))
#define MX_SHARED(type, name) MX_SHARED_ALIGNED(1, type, name)
#define MX_DYNAMIC_SHARED(type, name, align) type* const name = static_cast<type*>(::emu::dynamic_shared(align))
inline size_t __cvta_generic_to_shared(const void* p) { return ::emu::cvta_generic_to_shared(p); }

// ---- synchronisation, warp collectives --------------------------------------------------------------------------
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __activemask() ::emu::activemask()
#define __threadfence() ::emu::threadfence()
#define __threadfence_block() ::emu::threadfence()
#define __trap() ::emu::trap(__FILE__, __LINE__)

namespace emu {
enum class ShflKind : int { kIdx, kUp, kDown, kXor };
template <class T>
T shfl(const char* file, int line, ShflKind kind, unsigned mask, T v, int arg, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T>, "shuffles move bytes");
  static const char* const names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
  const int lane = static_cast<int>(lane_id());
  // CUDA: width must be a power of two <= 32; lanes are split into segments of `width`.
  const int w = (width >= 1 && width <= 32 && (width & (width - 1)) == 0) ? width : 32;
  const int base = lane & ~(w - 1);
  int src = lane;
  switch (kind) {
    case ShflKind::kIdx: src = base + (arg & (w - 1)); break;
    case ShflKind::kUp: src = (lane - base) - arg >= 0 ? lane - arg : lane; break;
    case ShflKind::kDown: src = (lane - base) + arg < w ? lane + arg : lane; break;
    case ShflKind::kXor: src = (lane ^ arg) < base + w && (lane ^ arg) >= 0 ? (lane ^ arg) : lane; break;
  }
  // Reading a lane outside the mask is undefined in CUDA: the runtime gives NaN bytes, so a result that depends on
  // it is wrong.
  T out;
  warp_shuffle_bytes(mask, &v, sizeof(T), &out, src, names[static_cast<int>(kind)], file, line);
  return out;
}
unsigned vote(const char* file, int line, int kind, unsigned mask, bool pred);  // 0 ballot, 1 any, 2 all
}  // namespace emu
#define __shfl_sync(...) ::emu::shfl(__FILE__, __LINE__, ::emu::ShflKind::kIdx, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl(__FILE__, __LINE__, ::emu::ShflKind::kUp, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl(__FILE__, __LINE__, ::emu::ShflKind::kDown, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shfl(__FILE__, __LINE__, ::emu::ShflKind::kXor, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::emu::vote(__FILE__, __LINE__, 0, (mask), static_cast<bool>(pred))
#define __any_sync(mask, pred) (::emu::vote(__FILE__, __LINE__, 1, (mask), static_cast<bool>(pred)) != 0)
#define __all_sync(mask, pred) (::emu::vote(__FILE__, __LINE__, 2, (mask), static_cast<bool>(pred)) != 0)

// ---- atomics ----------------------------------------------------------------------------------------------------
#define atomicAdd(addr, v) ::emu::atomic(__FILE__, __LINE__, ::emu::AtomicOp::kAdd, (addr), (v))
#define atomicMax(addr, v) ::emu::atomic(__FILE__, __LINE__, ::emu::AtomicOp::kMax, (addr), (v))
#define atomicMin(addr, v) ::emu::atomic(__FILE__, __LINE__, ::emu::AtomicOp::kMin, (addr), (v))
#define atomicExch(addr, v) ::emu::atomic(__FILE__, __LINE__, ::emu::AtomicOp::kExch, (addr), (v))
#define atomicOr(addr, v) ::emu::atomic(__FILE__, __LINE__, ::emu::AtomicOp::kOr, (addr), (v))
#define atomicAnd(addr, v) ::emu::atomic(__FILE__, __LINE__, ::emu::AtomicOp::kAnd, (addr), (v))
#define atomicXor(addr, v) ::emu::atomic(__FILE__, __LINE__, ::emu::AtomicOp::kXor, (addr), (v))
#define atomicCAS(addr, cmp, v) ::emu::atomic(__FILE__, __LINE__, ::emu::AtomicOp::kCas, (addr), (v), (cmp))

// ---- global loads -----------------------------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) {
  T v;
  ::emu::gmem_read(p, &v, sizeof(T), "__ldg");
  return v;
}

// ---- integer intrinsics -----------------------------------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }

// ---- float math -------------------------------------------------------------------------------------------------
// Exactly rounded operations are exact here too (the host's IEEE float); the approximate ones are perturbed within
// the maximum ulp error the CUDA C++ Programming Guide documents (Mathematical Functions: single-precision table and
// intrinsic functions table).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float a) { return a != a ? 0.f : (a < 0.f ? 0.f : (a > 1.f ? 1.f : a)); }
inline float rsqrtf(float a) { return ::emu::approx_exact(1.0 / std::sqrt(static_cast<double>(a)), 2.f, "rsqrtf"); }
// expf / exp2f / logf: 2, 2, 1 ulp (full range) in the single-precision table.
inline float expf_emu(float a) { return ::emu::approx_exact(std::exp(static_cast<double>(a)), 2.f, "expf"); }
inline float exp2f_emu(float a) { return ::emu::approx_exact(std::exp2(static_cast<double>(a)), 2.f, "exp2f"); }
inline float logf_emu(float a) { return ::emu::approx_exact(std::log(static_cast<double>(a)), 1.f, "logf"); }
inline float log2f_emu(float a) { return ::emu::approx_exact(std::log2(static_cast<double>(a)), 1.f, "log2f"); }
inline float tanhf_emu(float a) { return ::emu::approx_exact(std::tanh(static_cast<double>(a)), 2.f, "tanhf"); }
#define expf(x) expf_emu(x)
#define exp2f(x) exp2f_emu(x)
#define logf(x) logf_emu(x)
#define log2f(x) log2f_emu(x)
#define tanhf(x) tanhf_emu(x)
// __expf: "maximum ulp error is 2 + floor(abs(1.173 * x))"; __exp2f ("2 + floor(abs(1.173 * x))" as well, it is the
// same ex2.approx); __fdividef: 2 ulp for |y| in [2^-126, 2^126]; __logf: 2^-21.41 absolute in [0.5, 2], else 3 ulp.
inline float __expf(float a) {
  return ::emu::approx_exact(std::exp(static_cast<double>(a)), 2.f + std::floor(std::fabs(1.173f * a)), "__expf");
}
inline float __exp2f(float a) {
  return ::emu::approx_exact(std::exp2(static_cast<double>(a)), 2.f + std::floor(std::fabs(1.173f * a)), "__exp2f");
}
inline float __fdividef(float a, float b) {
  return ::emu::approx_exact(static_cast<double>(a) / b, 2.f, "__fdividef");
}
inline float __logf(float a) { return ::emu::approx_exact(std::log(static_cast<double>(a)), 3.f, "__logf"); }
inline float __frsqrt_rn(float a) { return 1.0f / std::sqrt(a); }
using std::fabs;
using std::fmax;
using std::fmin;
using std::sqrt;
// CUDA's integer and float min / max overloads (math_functions.hpp), as one template over the usual arithmetic
// conversions of the two arguments.
template <class A, class B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float fabsf(float a) { return std::fabs(a); }
inline float sqrtf(float a) { return std::sqrt(a); }
inline float floorf(float a) { return std::floor(a); }
inline float ceilf(float a) { return std::ceil(a); }
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }

// ---- bf16 / fp16 ------------------------------------------------------------------------------------------------
namespace emu {
// float -> bf16, round to nearest even; NaN -> 0x7FFF as cuda_bf16.hpp's host path gives.
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_bits_to_f32(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
// float -> IEEE binary16, round to nearest even, overflow to inf, gradual underflow; NaN -> 0x7FFF (cuda_fp16.hpp).
inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return 0x7fff;
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (absu < 0x38800000u) {                                                // below 2^-14: subnormal or zero
    if (absu < 0x33000000u) return static_cast<uint16_t>(sign);            // < 2^-25: rounds to zero (tie at 2^-25 too)
    const uint32_t mant = (absu & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(absu >> 23);  // 14 + (127 - e) - ... ; value = mant * 2^(e-150)
    // subnormal unit is 2^-24: result = mant * 2^(e - 150 + 24) = mant >> (126 - e)
    const uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    const uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | r);
  }
  // normal: rebias exponent 127 -> 15, round the 13 dropped mantissa bits to nearest even
  uint32_t v = absu - 0x38000000u;  // (127 - 15) << 23
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}
inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0x1f) {
    u = sign | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    u = sign | ((e + 112) << 23) | (m << 13);
  } else if (m == 0) {
    u = sign;
  } else {  // subnormal: m * 2^-24, exact in float
    u = sign | __float_as_uint(static_cast<float>(m) * 5.9604644775390625e-8f);
  }
  return __uint_as_float(u);
}
}  // namespace emu

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(::emu::f32_to_bf16_bits(f)) {}
  operator float() const { return ::emu::bf16_bits_to_f32(__x); }
};
struct __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(::emu::f32_to_f16_bits(f)) {}
  operator float() const { return ::emu::f16_bits_to_f32(__x); }
};
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
struct alignas(4) __half2 { __half x, y; };
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;
using half = __half;
using half2 = __half2;

inline __nv_bfloat16 __float2bfloat16(float f) { __nv_bfloat16 r; r.__x = ::emu::f32_to_bf16_bits(f); return r; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return ::emu::bf16_bits_to_f32(h.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 r; r.__x = u; return r; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __half __float2half(float f) { __half r; r.__x = ::emu::f32_to_f16_bits(f); return r; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return ::emu::f16_bits_to_f32(h.__x); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline __half __ushort_as_half(unsigned short u) { __half r; r.__x = u; return r; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }

#endif  // MIXTRAL_EMU_HOST_ONLY
