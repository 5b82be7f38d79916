// The emulation runtime's internals that the sm_90 primitives (sm90.cpp) build on, defined in runtime.cpp. Not for
// kernel code (that uses sm90.h through arch/sm90.cuh) and not for the binding.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace emu::rt {
int tid();                 // the current fiber's thread index in its CTA; -1 outside a kernel
int nthreads();            // threads per CTA of the current launch
uint64_t cta_serial();     // changes at every CTA start (per-CTA state is reset when it changes)
int kernel_num_regs();     // cudaFuncGetAttributes(...).numRegs of the running kernel
uint64_t site(const char* what, uintptr_t pc);  // a named report site: the operation and the code address
std::string describe(uint64_t site);
[[noreturn]] void report(const std::string& msg);  // records the report and abandons the CTA
void block(const char* what, uint64_t site);        // suspends the current fiber until wake(its tid)
void wake(int tid);                                 // makes a fiber suspended by block() runnable
// Happens-before: the current fiber's knowledge of every thread's clock (max of the last barrier and its own
// vector), joining such a vector into the current fiber (acquire), and advancing its own clock (after a release).
void knowledge(std::vector<uint32_t>& out);
void acquire(const std::vector<uint32_t>& v);
void tick();
uint32_t clock_of(int tid);  // the current fiber's own vector entry for thread tid (its own clock for its tid)
// Shared memory at a shared-window offset: bounds check and race detection, as the current fiber's access.
void shared_access(uint32_t off, size_t n, bool is_write, bool atomic, uint64_t site);
char* arena();  // shared offset 0 of the current CTA
// A global access by the current fiber: out-of-bounds check against the launch's buffers, byte counters.
void global_access(const void* p, size_t n, bool is_write, uint64_t site);
void set_generic_write_hook(void (*hook)(uint32_t off, size_t n));  // every generic-proxy shared write
void set_thread_exit_hook(void (*hook)(int tid));
}  // namespace emu::rt
