// The emulation runtime's host-side API, for the torch binding (csrc/emu/emu_ops.cpp). Torch-free.
//
// Global memory model: every buffer a launch may touch (inputs copied in, outputs, workspaces) is allocated from
// one reserved emulation region, each at a 256-byte aligned start with an unused gap (redzone) after it. An
// instrumented or primitive access that lands inside the region but outside every buffer is an out-of-bounds
// report naming the nearest buffer and the offset. Buffers live for one op: region_reset() frees them all.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace emu {

// The architecture the CUDA stand-ins answer for (compute capability, SM count, shared-memory limits): 80 or 90.
void set_arch(int arch);
int arch();
// cudaFuncGetAttributes(...).numRegs for every kernel (ptxas' answer on the real device is not known here).
void set_num_regs(int regs);  // also forgets the per-kernel values below
// numRegs for the kernels whose (demangled) name contains name_part; the last matching call wins.
void set_kernel_num_regs(const std::string& name_part, int regs);

// A buffer of `bytes` in the emulation region, named for reports. fill_nan: 0xFF bytes (NaN as float/bf16/fp16) so
// output elements a kernel fails to write are visible; otherwise zero. The address is `misalign` modulo 256 (a copy
// keeps its original's alignment, which launchers test to pick vector paths).
void* buffer_alloc(size_t bytes, const std::string& name, bool fill_nan, size_t misalign = 0);
// Frees every buffer (the start of each op).
void region_reset();

// The first report of the current op (race, deadlock, out-of-bounds, missing lane, usage error), "" if none. A
// report aborts the launch that made it and makes every later launch of the op a no-op until clear_error().
const std::string& error();
void clear_error();

// Counters per launch since reset_stats(), as JSON: [{"kernel", "grid": [x,y,z], "block": [x,y,z], "smem",
// "bytes_read", "bytes_written", "buffers": {name: [read, written, unique_read]}}, ...]. read / written count every
// access (instrumented loads and stores, emulated instructions, cp.async sources, atomics); unique_read counts each
// byte once per launch (the traffic if every re-read hit a cache).
std::string stats_json();
void reset_stats();
size_t launch_count();  // launches recorded since reset_stats()

// The runtime's own known-answer kernels (csrc/emu/selftest.cu): runs `name` on the given buffers; false if unknown.
bool run_selftest(const std::string& name, void* const* bufs, int nbufs, int64_t arg);
// The PTX wrappers' known-answer kernels (csrc/emu/ptx_selftest.cu, names "ptx_*"); false if unknown.
bool run_ptx_selftest(const std::string& name, void* const* bufs, int nbufs, int64_t arg);

}  // namespace emu
