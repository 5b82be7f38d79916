// The emulation runtime: runs kernels compiled from their CUDA source (cuda_emu.h) on the CPU and reports the bugs a
// GPU would hide. Compiled WITHOUT -fsanitize=thread: it defines the __tsan_* hooks the instrumented kernel code calls.
//
// Execution model: CTAs run one after another (deterministic order x, then y, then z). Each CUDA thread of the
// current CTA is a cooperative fiber with its own mmap'd stack (guard page below); a fiber runs until it blocks at a
// synchronisation point (__syncthreads, a warp collective) or exits, then the next ready fiber runs, in thread order.
// When no fiber is ready but some are alive, that is a deadlock: the report lists where every thread waits.
//
// Race detection (shared memory only): happens-before with vector clocks. Every thread t has a clock; an access is
// recorded per byte as an epoch (thread, clock, site). Edges:
//   __syncthreads   all threads; after it every thread knows every other's clock at the barrier. Stored once per CTA
//                   as the vector J (J[t] = t's clock at the last barrier), so a barrier costs O(threads).
//   __syncwarp      the lanes of its mask join their clocks (the CUDA Programming Guide: __syncwarp guarantees memory
//                   ordering among the threads participating in the barrier).
//   shuffles, votes NO edge: the Programming Guide states no memory ordering for them, only for __syncwarp and the
//                   block barriers, so a kernel that relies on a shuffle to order shared memory is reported.
//   atomics         atomic accesses do not race with each other (but do with plain accesses) and create no edge.
//   cp.async        the destination is race-checked as a write at issue; the bytes land (and are recorded as writes by
//                   the waiting thread) at the wait that covers them.
// Thread t's knowledge of u's clock is max(J[u], vc_t[u]); an earlier access (u, c) happens before t's access iff
// u == t or c <= that. Two accesses to the same byte, at least one a write, not ordered either way: a race.
#include "emu_host.h"

#define MIXTRAL_EMU 1
#include "cuda_emu.h"
#include "sm90.h"
#include "sm90_runtime.h"

#include <dlfcn.h>
#include <setjmp.h>
#include <signal.h>
#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>


namespace emu {

uint3 g_threadIdx{0, 0, 0}, g_blockIdx{0, 0, 0};
dim3 g_blockDim, g_gridDim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kArenaBytes = 256 * 1024;  // above every architecture's per-block limit
constexpr int kMaxThreads = 1024;

// ---- sites ------------------------------------------------------------------------------------------------------
// A site is either a raw code address (instrumented loads/stores: the hook's return address) or, with the top bit
// set, an index into a table of named sites (macro call sites with file:line, primitives with a name + caller PC).
constexpr uint64_t kNamedSite = uint64_t{1} << 63;
struct NamedSite {
  const char* what;
  const char* file;
  int line;
  uintptr_t pc;
};
std::vector<NamedSite> g_sites;
std::map<std::tuple<const void*, const void*, int, uintptr_t>, uint64_t> g_site_index;

uint64_t named_site_slow(const char* what, const char* file, int line, uintptr_t pc) {
  const auto key = std::make_tuple(static_cast<const void*>(what), static_cast<const void*>(file), line, pc);
  const auto it = g_site_index.find(key);
  if (it != g_site_index.end()) return it->second;
  const uint64_t id = kNamedSite | g_sites.size();
  g_sites.push_back({what, file, line, pc});
  g_site_index.emplace(key, id);
  return id;
}

// Primitives name their site on every call (each emulated load, shuffle, barrier): a direct-mapped cache in front of
// the table keeps that to a few instructions.
struct SiteCacheEntry {
  const char* what;
  const char* file;
  int line;
  uintptr_t pc;
  uint64_t id;
};
SiteCacheEntry g_site_cache[4096];

inline uint64_t named_site(const char* what, const char* file, int line, uintptr_t pc = 0) {
  const uintptr_t h = (reinterpret_cast<uintptr_t>(what) * 31 + reinterpret_cast<uintptr_t>(file) * 17 +
                       static_cast<uintptr_t>(line) * 131 + pc * 7) >> 3;
  SiteCacheEntry& e = g_site_cache[h % 4096];
  if (e.id && e.what == what && e.file == file && e.line == line && e.pc == pc) return e.id;
  e = {what, file, line, pc, named_site_slow(what, file, line, pc)};
  return e.id;
}

std::string short_path(const std::string& p) {
  // Reports name files relative to the source tree when they can (csrc/...), else the basename.
  const size_t k = p.rfind("csrc/");
  if (k != std::string::npos) return p.substr(k);
  const size_t s = p.rfind('/');
  return s == std::string::npos ? p : p.substr(s + 1);
}

// Code address -> "file:line (function)" through addr2line on the shared object that holds it (built with -g). With
// inlining (the arch/ wrappers are always inlined), the chain follows: "sm80.cuh:45 (cp_async_wait_group<2>) in
// attention_decode.cu:206 (attention_decode_kernel<...>)".
std::string symbolize(uintptr_t pc, bool function_only = false) {
  static std::unordered_map<uintptr_t, std::vector<std::pair<std::string, std::string>>> cache;
  auto it = cache.find(pc);
  if (it == cache.end()) {
    std::vector<std::pair<std::string, std::string>> frames;  // (function, location), innermost first
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(pc), &info) && info.dli_fname) {
      const uintptr_t off = pc - reinterpret_cast<uintptr_t>(info.dli_fbase);
      char cmd[4096];
      std::snprintf(cmd, sizeof(cmd), "addr2line -f -C -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                    static_cast<unsigned long>(off));
      if (FILE* f = popen(cmd, "r")) {
        char a[4096], b[4096];
        while (std::fgets(a, sizeof(a), f) && std::fgets(b, sizeof(b), f)) {
          std::string func = a, loc = b;
          while (!func.empty() && (func.back() == '\n' || func.back() == '\r')) func.pop_back();
          while (!loc.empty() && (loc.back() == '\n' || loc.back() == '\r')) loc.pop_back();
          const size_t d = loc.find(" (discriminator");
          if (d != std::string::npos) loc.resize(d);
          frames.emplace_back(func, short_path(loc));
        }
        pclose(f);
      }
      if ((frames.empty() || frames[0].first == "??") && info.dli_sname)
        frames.assign(1, {info.dli_sname, frames.empty() ? "?" : frames[0].second});
    }
    if (frames.empty()) frames.emplace_back("?", "?");
    it = cache.emplace(pc, std::move(frames)).first;
  }
  const auto& fr = it->second;
  if (function_only) return fr.back().first;
  std::string r;
  for (size_t i = 0; i < fr.size() && i < 3; ++i) r += (i ? " in " : "") + fr[i].second + " (" + fr[i].first + ")";
  return r;
}

std::string describe_site(uint64_t site) {
  if (site == 0) return "?";
  if (!(site & kNamedSite)) return symbolize(static_cast<uintptr_t>(site) - 1);
  const NamedSite& s = g_sites[site & ~kNamedSite];
  if (s.file && !s.pc) return short_path(s.file) + ":" + std::to_string(s.line);  // the caller names the operation
  std::string r = s.what ? s.what : "";
  if (s.pc) r += " at " + symbolize(s.pc - 1);
  return r;
}

// ---- launch state -----------------------------------------------------------------------------------------------
struct Buffer {
  char* base;
  size_t size;
  std::string name;
  uint64_t read = 0, written = 0;  // bytes, this launch (every access counts)
  uint64_t unique_read = 0;        // distinct bytes read, this launch (what a perfect cache would fetch)
  std::vector<uint64_t> seen;      // bit per byte read this launch (allocated on the first read)
};

struct LaunchStat {
  const void* kernel;
  dim3 grid, block;
  size_t smem;
  uint64_t bytes_read = 0, bytes_written = 0;
  std::vector<std::tuple<std::string, uint64_t, uint64_t, uint64_t>> buffers;  // name, read, written, unique read
};

struct AsyncCopy {
  uint32_t dst;
  std::vector<uint8_t> data;
  uint64_t issue_site;
};

enum class Wait : int { kNone, kBarrier, kWarp, kAsync };  // kAsync: the sm_90 primitives (sm90.cpp)

struct WarpColl;

struct Fiber {
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  char* stack = nullptr;  // usable stack [stack, stack + kStackBytes), guard page below
  int tid = 0;
  uint3 idx{0, 0, 0};
  bool exited = false, blocked = false;
  Wait wait = Wait::kNone;
  uint64_t wait_site = 0;
  const char* wait_what = nullptr;
  unsigned wait_mask = 0;
  WarpColl* coll = nullptr;
  std::vector<uint32_t> vc;
  std::vector<AsyncCopy> uncommitted;
  std::deque<std::vector<AsyncCopy>> groups;
};

struct WarpColl {
  unsigned mask = 0, arrived = 0;
  const char* what = nullptr;
  uint64_t site = 0;
  size_t bytes = 0;
  bool orders_memory = false;
  std::vector<uint8_t> data;  // [32][bytes]
  int readers = 0;            // lanes that still have to copy their result out
};

struct Shadow {  // one per shared-memory byte; valid only when gen == the current CTA's generation
  uint64_t w_site, r_site;
  uint32_t w_clk, r_clk;
  uint32_t gen;
  uint16_t w_tid, r_tid;
  uint8_t w_flags, r_flags;  // kValid | kAtomic | kList (reads: several unordered readers, see g_read_lists)
};
constexpr uint8_t kValid = 1, kAtomic = 2, kList = 4;
struct ReadEpoch {
  uint16_t tid;
  uint32_t clk;
  uint64_t site;
  bool atomic;
};

int g_arch = 90;
int g_num_regs = 168;
std::vector<std::pair<std::string, int>> g_num_regs_by_name;  // (part of the kernel's name, numRegs), last wins
std::unordered_map<const void*, size_t> g_func_static_smem;   // measured at each kernel's last launch
cudaError_t g_last_error = cudaSuccess;
std::string g_error;

// region
char* g_region = nullptr;
size_t g_region_size = size_t{64} << 30;
size_t g_region_used = 0, g_region_committed = 0;
std::vector<Buffer> g_buffers;  // sorted by base
Buffer* g_last_buffer = nullptr;

std::vector<LaunchStat> g_stats;
std::unordered_map<const void*, int> g_func_max_dyn_smem;

// current launch / CTA
bool g_in_launch = false;
LaunchBody g_body{};
const void* g_kernel = nullptr;
dim3 g_grid, g_block;
size_t g_dyn_smem = 0;
LaunchStat* g_stat = nullptr;
int g_nthreads = 0;
std::vector<std::unique_ptr<Fiber>> g_fibers;
std::vector<char*> g_stack_pool;
Fiber* g_cur = nullptr;
void* g_sched_sp = nullptr;
#if !defined(__x86_64__)
ucontext_t g_sched_uc;
#endif
std::deque<int> g_ready;
int g_live = 0, g_exited = 0;
int g_bar_arrived = 0;
std::vector<uint32_t> g_J;
std::vector<std::vector<WarpColl*>> g_open;  // per warp
std::vector<unsigned> g_warp_exited;         // per warp: lanes that have exited
std::vector<WarpColl*> g_coll_pool;          // finished collectives, reused (their data keeps its capacity)

WarpColl* new_coll() {
  if (g_coll_pool.empty()) return new WarpColl;
  WarpColl* c = g_coll_pool.back();
  g_coll_pool.pop_back();
  c->arrived = 0;
  return c;
}
void free_coll(WarpColl* c) { g_coll_pool.push_back(c); }
bool g_abort = false;

// shared arena
char* g_arena = nullptr;
size_t g_arena_used = 0, g_smem_limit = 0;
std::vector<std::pair<const void*, size_t>> g_static_objs;  // (key, offset) this CTA
std::vector<Shadow> g_shadow;
uint32_t g_gen = 0;
// Per shared byte with several unordered readers: their epochs. Indexed by offset; inner vectors keep their capacity
// across CTAs (only the touched ones are cleared), so steady-state emulation allocates nothing here.
std::vector<std::vector<ReadEpoch>> g_read_lists;
std::vector<uint32_t> g_read_lists_used;
std::vector<ReadEpoch>& read_list(uint32_t b) {
  if (g_read_lists.empty()) g_read_lists.resize(kArenaBytes);
  return g_read_lists[b];
}

// ---- reports ----------------------------------------------------------------------------------------------------
std::string kernel_name(const void* k) { return symbolize(reinterpret_cast<uintptr_t>(k), true); }

int num_regs_of(const void* f) {
  int r = g_num_regs;
  if (!g_num_regs_by_name.empty()) {
    const std::string name = kernel_name(f);
    for (const auto& [part, regs] : g_num_regs_by_name)
      if (name.find(part) != std::string::npos) r = regs;
  }
  return r;
}

std::string fmt3(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

std::string ranges(const std::vector<int>& ids) {
  std::string r;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!r.empty()) r += ",";
    r += std::to_string(ids[i]);
    if (j > i) r += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return r;
}

std::string lanes_of(unsigned m) {
  std::vector<int> v;
  for (int i = 0; i < 32; ++i)
    if ((m >> i) & 1u) v.push_back(i);
  return v.empty() ? "none" : ranges(v);
}

std::string where() {
  std::string s = "emu: kernel " + kernel_name(g_kernel) + ", grid " + fmt3(g_grid) + ", block " + fmt3(g_block) +
                  ": CTA " + fmt3(g_blockIdx);
  if (g_cur) s += ", thread " + std::to_string(g_cur->tid) + " " + fmt3(g_cur->idx);
  return s + ": ";
}

void switch_to_scheduler();

// Records the first report and abandons the CTA: the calling fiber never resumes.
[[noreturn]] void report(const std::string& msg) {
  if (g_error.empty()) g_error = (g_in_launch ? where() : std::string("emu: ")) + msg;
  g_abort = true;
  if (g_cur) switch_to_scheduler();
  throw std::runtime_error(g_error);  // outside a fiber (host code): cannot return to a kernel
}

// ---- fibers -----------------------------------------------------------------------------------------------------
extern "C" void emu_fiber_entry(Fiber* f);

#if defined(__x86_64__)
// emu_ctx_switch(void** save_sp, void* new_sp): saves the callee-saved registers, MXCSR and the x87 control word on
// the current stack, stores the stack pointer, switches to new_sp and restores the same from there.
asm(R"(
.text
.globl emu_ctx_switch
.type emu_ctx_switch,@function
emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_ctx_switch,.-emu_ctx_switch
.globl emu_fiber_trampoline
.type emu_fiber_trampoline,@function
emu_fiber_trampoline:
  movq %r12, %rdi
  call emu_fiber_entry
  ud2
.size emu_fiber_trampoline,.-emu_fiber_trampoline
)");
extern "C" void emu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void emu_fiber_trampoline();

void fiber_init(Fiber* f) {
  uintptr_t top = reinterpret_cast<uintptr_t>(f->stack + kStackBytes) & ~uintptr_t{15};
  uint64_t* a = reinterpret_cast<uint64_t*>(top - 24);  // return address slot: after `ret`, rsp is 16-aligned
  a[0] = reinterpret_cast<uint64_t>(&emu_fiber_trampoline);
  a[-1] = 0;                                     // rbp
  a[-2] = 0;                                     // rbx
  a[-3] = reinterpret_cast<uint64_t>(f);         // r12: the trampoline's argument
  a[-4] = a[-5] = a[-6] = 0;                     // r13 r14 r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  uint16_t cw;
  asm volatile("fnstcw %0" : "=m"(cw));
  csr[1] = cw;
  std::memcpy(&a[-7], csr, 8);
  f->sp = &a[-7];
}
void switch_into(Fiber* f) { emu_ctx_switch(&g_sched_sp, f->sp); }
void switch_to_scheduler() {
  Fiber* f = g_cur;
  emu_ctx_switch(&f->sp, g_sched_sp);
}
#else
void uc_entry(unsigned lo, unsigned hi) {
  emu_fiber_entry(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
void fiber_init(Fiber* f) {
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = kStackBytes;
  f->uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->uc, reinterpret_cast<void (*)()>(&uc_entry), 2, static_cast<unsigned>(p),
              static_cast<unsigned>(p >> 32));
}
void switch_into(Fiber* f) { swapcontext(&g_sched_uc, &f->uc); }
void switch_to_scheduler() { swapcontext(&g_cur->uc, &g_sched_uc); }
#endif

char* take_stack() {
  if (!g_stack_pool.empty()) {
    char* s = g_stack_pool.back();
    g_stack_pool.pop_back();
    return s;
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (m == MAP_FAILED) throw std::runtime_error("emu: cannot map a fiber stack");
  mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting a neighbour
  return static_cast<char*>(m) + page;
}

void block_current(Wait w, uint64_t site, const char* what, unsigned mask = 0) {
  Fiber* f = g_cur;
  f->blocked = true;
  f->wait = w;
  f->wait_site = site;
  f->wait_what = what;
  f->wait_mask = mask;
  switch_to_scheduler();
  // resumed by make_ready
}

void make_ready(Fiber* f) {
  f->blocked = false;
  f->wait = Wait::kNone;
  g_ready.push_back(f->tid);
}

unsigned existing_lanes(int warp) {
  const int n = std::min(32, g_nthreads - warp * 32);
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// Lanes of `warp` that have exited, or do not exist (a block size that is not a multiple of 32).
unsigned exited_lanes(int warp) { return ~existing_lanes(warp) | g_warp_exited[warp]; }

void (*g_thread_exit_hook)(int tid) = nullptr;  // sm90.cpp: work a thread leaves pending (wgmma groups)

void thread_exit() {
  Fiber* f = g_cur;
  if (g_thread_exit_hook) g_thread_exit_hook(f->tid);
  f->exited = true;
  g_warp_exited[f->tid / 32] |= 1u << (f->tid % 32);
  ++g_exited;
  --g_live;
  if (g_bar_arrived > 0) {
    std::vector<int> waiting;
    uint64_t site = 0;
    for (auto& o : g_fibers)
      if (o->blocked && o->wait == Wait::kBarrier) {
        waiting.push_back(o->tid);
        site = o->wait_site;
      }
    report("thread " + std::to_string(f->tid) + " exited without reaching the __syncthreads at " +
           describe_site(site) + " where threads " + ranges(waiting) + " wait (a barrier must be reached by every "
           "non-exited thread of the block)");
  }
  const int warp = f->tid / 32, lane = f->tid % 32;
  for (WarpColl* c : g_open[warp])
    if ((c->mask >> lane) & 1u)
      report("lane " + std::to_string(lane) + " of warp " + std::to_string(warp) + " exited without joining the " +
             c->what + " at " + describe_site(c->site) + " (mask 0x" + [&] {
               char b[16];
               std::snprintf(b, sizeof b, "%08x", c->mask);
               return std::string(b);
             }() + ") that lanes " + lanes_of(c->arrived) + " wait in");
  switch_to_scheduler();
}

std::string hex32(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", m);
  return b;
}

// ---- race detector ----------------------------------------------------------------------------------------------
inline bool hb(uint16_t t, uint32_t clk, const Fiber* u) {
  return t == u->tid || clk <= std::max(g_J[t], u->vc[t]);
}

// A site with the operation's name when the site itself is just file:line (macro call sites).
std::string describe_op(uint64_t site) {
  if (site & kNamedSite) {
    const NamedSite& s = g_sites[site & ~kNamedSite];
    if (s.file && !s.pc && s.what) return std::string("in ") + s.what + " at " + describe_site(site);
  }
  return "at " + describe_site(site);
}

[[noreturn]] void race(uint32_t off, size_t n, bool is_write, uint64_t site, uint16_t other, bool other_write,
                       uint64_t other_site) {
  report(std::string("shared-memory race on byte ") + std::to_string(off) + " (shared offset; access of " +
         std::to_string(n) + " bytes): thread " + std::to_string(g_cur->tid) + " " + (is_write ? "writes" : "reads") +
         " " + describe_op(site) + "; thread " + std::to_string(other) + " " + (other_write ? "wrote" : "read") +
         " it " + describe_op(other_site) +
         ", and no barrier (__syncthreads, __syncwarp) orders the two");
}

void (*g_generic_write_hook)(uint32_t off, size_t n) = nullptr;  // sm90.cpp: fence.proxy.async tracking

void shared_access(uint32_t off, size_t n, bool is_write, bool atomic, uint64_t site) {
  Fiber* u = g_cur;
  if (is_write && g_generic_write_hook) g_generic_write_hook(off, n);
  const uint32_t clk = u->vc[u->tid];
  for (uint32_t b = off; b < off + n; ++b) {
    Shadow& s = g_shadow[b];
    if (s.gen != g_gen) {
      s.gen = g_gen;
      s.w_flags = s.r_flags = 0;
    }
    if ((s.w_flags & kValid) && !hb(s.w_tid, s.w_clk, u) && !(atomic && (s.w_flags & kAtomic)))
      race(b, n, is_write, site, s.w_tid, true, s.w_site);
    if (is_write) {
      if (s.r_flags & kList) {
        for (const ReadEpoch& e : read_list(b))
          if (!hb(e.tid, e.clk, u) && !(atomic && e.atomic)) race(b, n, true, site, e.tid, false, e.site);
        read_list(b).clear();
      } else if ((s.r_flags & kValid) && !hb(s.r_tid, s.r_clk, u) && !(atomic && (s.r_flags & kAtomic))) {
        race(b, n, true, site, s.r_tid, false, s.r_site);
      }
      s.w_tid = static_cast<uint16_t>(u->tid);
      s.w_clk = clk;
      s.w_site = site;
      s.w_flags = kValid | (atomic ? kAtomic : 0);
      s.r_flags = 0;
    } else {
      if (s.r_flags & kList) {
        auto& l = read_list(b);
        bool found = false;
        for (ReadEpoch& e : l)
          if (e.tid == u->tid) {
            e = {static_cast<uint16_t>(u->tid), clk, site, atomic};
            found = true;
          }
        if (!found) l.push_back({static_cast<uint16_t>(u->tid), clk, site, atomic});
      } else if (!(s.r_flags & kValid) || hb(s.r_tid, s.r_clk, u)) {
        s.r_tid = static_cast<uint16_t>(u->tid);
        s.r_clk = clk;
        s.r_site = site;
        s.r_flags = kValid | (atomic ? kAtomic : 0);
      } else {
        auto& l = read_list(b);
        l.clear();
        l.push_back({s.r_tid, s.r_clk, s.r_site, (s.r_flags & kAtomic) != 0});
        l.push_back({static_cast<uint16_t>(u->tid), clk, site, atomic});
        g_read_lists_used.push_back(b);
        s.r_flags = kValid | kList;
      }
    }
  }
}

// ---- memory classification --------------------------------------------------------------------------------------
inline bool in_arena(const void* p) {
  return g_arena && static_cast<size_t>(static_cast<const char*>(p) - g_arena) < kArenaBytes;
}
inline bool in_region(const void* p) {
  return g_region && static_cast<size_t>(static_cast<const char*>(p) - g_region) < g_region_size;
}

void check_shared_range(uint32_t off, size_t n, bool is_write, uint64_t site) {
  if (uint64_t{off} + n > g_arena_used)
    report(std::string("shared-memory out-of-bounds ") + (is_write ? "write" : "read") + " of " + std::to_string(n) +
           " bytes at shared offset " + std::to_string(off) + " at " + describe_site(site) + ": the CTA has " +
           std::to_string(g_arena_used) + " bytes (" + std::to_string(g_dyn_smem) + " dynamic)");
}

Buffer* find_buffer(const char* p) {
  if (g_last_buffer && p >= g_last_buffer->base && p < g_last_buffer->base + g_last_buffer->size) return g_last_buffer;
  auto it = std::upper_bound(g_buffers.begin(), g_buffers.end(), p,
                             [](const char* a, const Buffer& b) { return a < b.base; });
  if (it == g_buffers.begin()) return nullptr;
  --it;
  if (p < it->base + it->size) return g_last_buffer = &*it;
  return nullptr;
}

void global_access(const char* p, size_t n, bool is_write, uint64_t site) {
  Buffer* b = find_buffer(p);
  if (!b || p + n > b->base + b->size) {
    // Name the nearest buffer: the one that ends at or below p, or the one p falls short of.
    std::string near = "no buffer";
    const Buffer* below = nullptr;
    const Buffer* above = nullptr;
    for (const Buffer& x : g_buffers) {
      if (x.base <= p) below = &x;
      else if (!above) above = &x;
    }
    if (b) {
      near = "buffer '" + b->name + "' (" + std::to_string(b->size) + " bytes): the access covers bytes " +
             std::to_string(p - b->base) + ".." + std::to_string(p - b->base + n - 1);
    } else if (below && (!above || p - (below->base + below->size) <= above->base - p)) {
      near = std::to_string(p - (below->base + below->size)) + " bytes past the end of buffer '" + below->name +
             "' (" + std::to_string(below->size) + " bytes; offset " + std::to_string(p - below->base) + ")";
    } else if (above) {
      near = std::to_string(above->base - p) + " bytes before the start of buffer '" + above->name + "' (" +
             std::to_string(above->size) + " bytes)";
    }
    report(std::string("global out-of-bounds ") + (is_write ? "write" : "read") + " of " + std::to_string(n) +
           " bytes at " + describe_site(site) + ": " + near);
  }
  if (is_write) {
    b->written += n;
    g_stat->bytes_written += n;
  } else {
    b->read += n;
    if (b->seen.empty()) b->seen.assign((b->size + 63) / 64, 0);
    for (size_t i = static_cast<size_t>(p - b->base), e = i + n; i < e; ++i) {
      uint64_t& word = b->seen[i / 64];
      const uint64_t bit = uint64_t{1} << (i % 64);
      if (!(word & bit)) {
        word |= bit;
        ++b->unique_read;
      }
    }
    g_stat->bytes_read += n;
  }
}

// Every checked access (instrumented or primitive) of the current fiber.
// Threads are cooperative: one that waits for memory another thread writes, without a synchronisation point, would
// spin forever. A fiber that makes this many memory accesses without yielding is reported instead.
constexpr uint64_t kSpinAccessLimit = uint64_t{1} << 26;
uint64_t g_accesses_since_yield = 0;
[[noreturn]] void spin_report(uint64_t site);

inline void on_access(const void* p, size_t n, bool is_write, uint64_t site, bool atomic = false) {
  if (!g_cur) return;  // host code of the launchers
  if (++g_accesses_since_yield > kSpinAccessLimit) spin_report(site);
  if (in_arena(p)) {
    const uint32_t off = static_cast<uint32_t>(static_cast<const char*>(p) - g_arena);
    check_shared_range(off, n, is_write, site);
    shared_access(off, n, is_write, atomic, site);
  } else if (in_region(p)) {
    global_access(static_cast<const char*>(p), n, is_write, site);
  }
}

void spin_report(uint64_t site) {
  report("thread made " + std::to_string(kSpinAccessLimit) + " memory accesses without reaching a synchronisation "
         "point (last at " + describe_site(site) + "): a spin-wait on memory that another thread writes? The emulator "
         "runs threads cooperatively, switching only at barriers, warp collectives and async waits");
}

// ---- warp collectives -------------------------------------------------------------------------------------------
void warp_join_clocks(int warp, unsigned mask) {
  std::vector<Fiber*> lanes;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) lanes.push_back(g_fibers[warp * 32 + l].get());
  for (int t = 0; t < g_nthreads; ++t) {
    uint32_t m = g_J[t];
    for (Fiber* f : lanes) m = std::max(m, f->vc[t]);
    for (Fiber* f : lanes) f->vc[t] = m;
  }
  for (Fiber* f : lanes) ++f->vc[f->tid];
}

// all: receives every lane's bytes ([32][bytes], lanes in the mask written), or, with src >= 0, only lane src's.
void collective(unsigned mask, const void* mine, size_t bytes, void* all, const char* what, uint64_t site,
                bool orders_memory, int src = -1) {
  if (!g_cur) report(std::string(what) + " called outside a kernel");
  Fiber* f = g_cur;
  const int warp = f->tid / 32, lane = f->tid % 32;
  if (!((mask >> lane) & 1u))
    report(std::string(what) + " at " + describe_site(site) + ": lane " + std::to_string(lane) +
           " calls it with mask " + hex32(mask) + ", which does not include the lane itself");
  const unsigned gone = exited_lanes(warp) & mask;
  if (gone) {
    const unsigned missing_threads = mask & ~existing_lanes(warp);
    report(std::string(what) + " at " + describe_site(site) + " with mask " + hex32(mask) + " in warp " +
           std::to_string(warp) + ": lanes " + lanes_of(gone) + (missing_threads ? " do not exist or" : "") +
           " have exited and can never join");
  }
  auto& open = g_open[warp];
  WarpColl* c = nullptr;
  for (WarpColl* o : open)
    if (o->mask == mask && std::strcmp(o->what, what) == 0 && !((o->arrived >> lane) & 1u)) {
      c = o;
      break;
    }
  if (!c) {
    for (WarpColl* o : open)
      if ((o->mask >> lane) & 1u)
        report(std::string("mismatched warp collectives in warp ") + std::to_string(warp) + ": lane " +
               std::to_string(lane) + " calls " + what + " at " + describe_site(site) + " with mask " + hex32(mask) +
               " while lanes " + lanes_of(o->arrived) + " wait in " + o->what + " at " + describe_site(o->site) +
               " with mask " + hex32(o->mask) + ", which includes lane " + std::to_string(lane));
    c = new_coll();
    c->mask = mask;
    c->what = what;
    c->site = site;
    c->bytes = bytes;
    c->orders_memory = orders_memory;
    c->data.assign(32 * bytes, 0);
    c->readers = __builtin_popcount(mask);
    open.push_back(c);
  } else if (c->bytes != bytes) {
    report(std::string(what) + " at " + describe_site(site) + ": lane " + std::to_string(lane) + " exchanges " +
           std::to_string(bytes) + " bytes, the lanes waiting at " + describe_site(c->site) + " " +
           std::to_string(c->bytes));
  }
  if (bytes) std::memcpy(c->data.data() + lane * bytes, mine, bytes);
  c->arrived |= 1u << lane;
  if (c->arrived == c->mask) {
    open.erase(std::find(open.begin(), open.end(), c));
    if (c->orders_memory) warp_join_clocks(warp, mask);
    for (int l = 0; l < 32; ++l)
      if (l != lane && ((mask >> l) & 1u)) make_ready(g_fibers[warp * 32 + l].get());
  } else {
    f->coll = c;
    block_current(Wait::kWarp, site, what, mask);
  }
  if (src >= 0) {
    if (src < 32 && ((mask >> src) & 1u)) std::memcpy(all, c->data.data() + src * bytes, bytes);
    else std::memset(all, 0xFF, bytes);
  } else {
    for (int l = 0; l < 32; ++l)
      if (bytes && ((mask >> l) & 1u))
        std::memcpy(static_cast<char*>(all) + l * bytes, c->data.data() + l * bytes, bytes);
  }
  f->coll = nullptr;
  if (--c->readers == 0) free_coll(c);
}

// ---- deadlock -----------------------------------------------------------------------------------------------------
[[noreturn]] void deadlock() {
  std::map<std::string, std::vector<int>> groups;
  std::vector<int> exited;
  for (auto& f : g_fibers) {
    if (f->exited) {
      exited.push_back(f->tid);
      continue;
    }
    // e.g. "wait at __syncthreads csrc/kernels/rms_norm.cu:48"
    std::string d = std::string("wait at ") + (f->wait_what ? f->wait_what : "?") + " " + describe_site(f->wait_site);
    if (f->wait == Wait::kWarp) d += " (mask " + hex32(f->wait_mask) + ")";
    groups[d].push_back(f->tid);
  }
  std::vector<std::pair<int, std::string>> lines;
  for (auto& [d, ids] : groups) lines.push_back({ids.front(), "threads " + ranges(ids) + " " + d});
  std::sort(lines.begin(), lines.end());
  std::string msg = "deadlock: no thread can make progress; ";
  for (size_t i = 0; i < lines.size(); ++i) msg += (i ? "; " : "") + lines[i].second;
  if (!exited.empty()) msg += "; threads " + ranges(exited) + " exited";
  g_cur = nullptr;
  if (g_error.empty()) g_error = where() + msg;
  g_abort = true;
  throw std::runtime_error(g_error);
}

// ---- faults -------------------------------------------------------------------------------------------------------
// A segmentation fault or bus error in kernel code (a wild pointer outside the emulation region, a fiber stack
// overflow into its guard page) becomes a report: the handler, on its own stack, jumps back to the scheduler, which
// abandons the CTA. Installed for the duration of a launch only.
sigjmp_buf g_fault_jmp;
volatile uintptr_t g_fault_addr = 0, g_fault_pc = 0;
volatile int g_fault_sig = 0;
struct sigaction g_old_segv, g_old_bus;
std::vector<char> g_alt_stack;

void fault_handler(int sig, siginfo_t* info, void* uctx) {
  g_fault_sig = sig;
  g_fault_addr = reinterpret_cast<uintptr_t>(info->si_addr);
#if defined(__x86_64__)
  g_fault_pc = static_cast<uintptr_t>(static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_RIP]);
#else
  (void)uctx;
  g_fault_pc = 0;
#endif
  if (!g_cur) {  // not in kernel code: the runtime's own bug, let the default action happen
    sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
    return;
  }
  siglongjmp(g_fault_jmp, 1);
}

void install_fault_handlers() {
  if (g_alt_stack.empty()) {
    g_alt_stack.resize(256 * 1024);
    stack_t ss{};
    ss.ss_sp = g_alt_stack.data();
    ss.ss_size = g_alt_stack.size();
    sigaltstack(&ss, nullptr);
  }
  struct sigaction sa{};
  sa.sa_sigaction = fault_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
}

void remove_fault_handlers() {
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
}

void fault_report() {
  Fiber* f = g_cur;
  const uintptr_t a = g_fault_addr;
  std::string what = (g_fault_sig == SIGBUS ? "bus error" : "segmentation fault") + std::string(" at address 0x");
  char buf[32];
  std::snprintf(buf, sizeof buf, "%lx", static_cast<unsigned long>(a));
  what += buf;
  if (a >= reinterpret_cast<uintptr_t>(f->stack) - 65536 && a < reinterpret_cast<uintptr_t>(f->stack))
    what += " (the thread's stack overflowed its " + std::to_string(kStackBytes / 1024) + " KiB)";
  else if (!in_arena(reinterpret_cast<void*>(a)) && !in_region(reinterpret_cast<void*>(a)))
    what += " (neither shared memory nor a buffer of the launch)";
  if (g_fault_pc) what += " in " + symbolize(g_fault_pc);
  if (g_error.empty()) g_error = where() + what;
  g_abort = true;
}

// ---- CTA execution ----------------------------------------------------------------------------------------------
uint64_t g_cta_serial = 0;

void run_cta(uint3 bid) {
  g_blockIdx = bid;
  ++g_cta_serial;
  ++g_gen;
  if (g_gen == 0) {  // generation wrapped: every shadow entry must be invalid again
    std::fill(g_shadow.begin(), g_shadow.end(), Shadow{});
    g_gen = 1;
  }
  for (uint32_t b : g_read_lists_used) g_read_lists[b].clear();
  g_read_lists_used.clear();
  std::memset(g_arena, 0xFF, g_dyn_smem);  // static objects are filled when a CTA allocates them
  g_arena_used = g_dyn_smem;
  g_static_objs.clear();
  g_ready.clear();
  g_bar_arrived = 0;
  g_live = g_nthreads;
  g_exited = 0;
  std::fill(g_J.begin(), g_J.end(), 0u);
  for (auto& o : g_open) {
    for (WarpColl* c : o) free_coll(c);
    o.clear();
  }
  std::fill(g_warp_exited.begin(), g_warp_exited.end(), 0u);
  for (int t = 0; t < g_nthreads; ++t) {
    Fiber* f = g_fibers[t].get();
    f->exited = f->blocked = false;
    f->wait = Wait::kNone;
    f->coll = nullptr;
    std::fill(f->vc.begin(), f->vc.end(), 0u);
    f->vc[t] = 1;
    f->uncommitted.clear();
    f->groups.clear();
    fiber_init(f);
    g_ready.push_back(t);
  }
  if (sigsetjmp(g_fault_jmp, 1) != 0) fault_report();  // a fault in kernel code (fault_handler) lands here
  while (!g_ready.empty() && !g_abort) {
    Fiber* f = g_fibers[g_ready.front()].get();
    g_ready.pop_front();
    g_cur = f;
    g_threadIdx = f->idx;
    g_accesses_since_yield = 0;
    switch_into(f);
    g_cur = nullptr;
  }
  if (!g_abort && g_live > 0) deadlock();
}

}  // namespace

extern "C" void emu_fiber_entry(Fiber* f) {
  (void)f;
  g_body.run(g_body.ctx);
  thread_exit();
  __builtin_unreachable();
}

// ---- primitives -------------------------------------------------------------------------------------------------
unsigned lane_id() { return g_cur ? static_cast<unsigned>(g_cur->tid % 32) : 0u; }
unsigned warp_id() { return g_cur ? static_cast<unsigned>(g_cur->tid / 32) : 0u; }

void warp_exchange_bytes(unsigned mask, const void* mine, size_t bytes, void* all, const char* what,
                         const char* file, int line) {
  const uintptr_t pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  // Named-site callers (shuffles, votes) pass their macro's file:line; warp_exchange from arch/ wrappers passes the
  // header's, so the caller's PC says which instruction in which kernel.
  const bool from_wrapper = std::strcmp(what, "warp_exchange") == 0;
  collective(mask, mine, bytes, all, what, named_site(what, file, line, from_wrapper ? pc : 0), false);
}

void warp_shuffle_bytes(unsigned mask, const void* mine, size_t bytes, void* out, int src, const char* what,
                        const char* file, int line) {
  collective(mask, mine, bytes, out, what, named_site(what, file, line), false, src);
}

unsigned vote(const char* file, int line, int kind, unsigned mask, bool pred) {
  static const char* const names[] = {"__ballot_sync", "__any_sync", "__all_sync"};
  uint8_t all[32];
  const uint8_t mine = pred ? 1 : 0;
  collective(mask, &mine, 1, all, names[kind], named_site(names[kind], file, line), false);
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && all[l]) ballot |= 1u << l;
  if (kind == 0) return ballot;
  if (kind == 1) return ballot != 0;
  return ballot == mask;
}

void syncwarp(const char* file, int line, unsigned mask) {
  collective(mask, nullptr, 0, nullptr, "__syncwarp", named_site("__syncwarp", file, line), true);
}

unsigned activemask() {
  if (!g_cur) return 0;
  const int warp = g_cur->tid / 32;
  return existing_lanes(warp) & ~exited_lanes(warp);
}

void threadfence() {}

void syncthreads(const char* file, int line) {
  if (!g_cur) report("__syncthreads called outside a kernel");
  const uint64_t site = named_site("__syncthreads", file, line);
  if (g_exited > 0) {
    std::vector<int> gone;
    for (auto& f : g_fibers)
      if (f->exited) gone.push_back(f->tid);
    report("__syncthreads at " + describe_site(site) + " reached after threads " + ranges(gone) +
           " exited (a barrier must be reached by every thread of the block)");
  }
  if (++g_bar_arrived == g_nthreads) {
    g_bar_arrived = 0;
    for (int t = 0; t < g_nthreads; ++t) g_J[t] = g_fibers[t]->vc[t];
    for (int t = 0; t < g_nthreads; ++t) {
      Fiber* f = g_fibers[t].get();
      ++f->vc[t];
      if (f != g_cur) make_ready(f);
    }
    return;
  }
  block_current(Wait::kBarrier, site, "__syncthreads");
}

void trap(const char* file, int line) { report("__trap() at " + short_path(file) + ":" + std::to_string(line)); }

void fail(const char* what) {
  const uintptr_t pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  report(std::string(what) + " (at " + symbolize(pc - 1) + ")");
}

void* dynamic_shared(size_t align) {
  if (!g_cur) report("dynamic shared memory requested outside a kernel");
  if (align > 1024 || (align & (align - 1)))
    report("dynamic shared memory alignment " + std::to_string(align) + " is not a power of two <= 1024");
  return g_arena;  // the arena is 1024-byte aligned (mmap'd); dynamic memory starts at offset 0
}

void* shared_object(const void* key, size_t bytes, size_t align, const char* file, int line) {
  if (!g_cur) report("static shared memory declared outside a kernel");
  for (auto& [k, off] : g_static_objs)
    if (k == key) return g_arena + off;
  const size_t off = (g_arena_used + align - 1) & ~(align - 1);
  if (off + bytes > g_smem_limit)
    report("static shared object at " + short_path(file) + ":" + std::to_string(line) + " (" + std::to_string(bytes) +
           " bytes) does not fit: " + std::to_string(g_arena_used) + " bytes are in use and sm_" +
           std::to_string(g_arch) + " allows " + std::to_string(g_smem_limit) + " per block");
  g_arena_used = off + bytes;
  std::memset(g_arena + off, 0xFF, bytes);
  g_static_objs.push_back({key, off});
  return g_arena + off;
}

uint32_t cvta_generic_to_shared(const void* p) {
  if (!in_arena(p)) {
    const uintptr_t pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
    report("__cvta_generic_to_shared of a pointer that is not in shared memory (at " + symbolize(pc - 1) + ")");
  }
  return static_cast<uint32_t>(static_cast<const char*>(p) - g_arena);
}

void smem_read(uint32_t saddr, void* dst, size_t bytes, const char* what) {
  const uint64_t site = named_site(what, nullptr, 0, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
  if (!g_cur) report(std::string(what) + ": shared memory read outside a kernel");
  check_shared_range(saddr, bytes, false, site);
  shared_access(saddr, bytes, false, false, site);
  std::memcpy(dst, g_arena + saddr, bytes);
}

void smem_write(uint32_t saddr, const void* src, size_t bytes, const char* what) {
  const uint64_t site = named_site(what, nullptr, 0, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
  if (!g_cur) report(std::string(what) + ": shared memory write outside a kernel");
  check_shared_range(saddr, bytes, true, site);
  shared_access(saddr, bytes, true, false, site);
  std::memcpy(g_arena + saddr, src, bytes);
}

void gmem_read(const void* gaddr, void* dst, size_t bytes, const char* what) {
  const uint64_t site = named_site(what, nullptr, 0, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
  on_access(gaddr, bytes, false, site);
  std::memcpy(dst, gaddr, bytes);
}

void gmem_write(void* gaddr, const void* src, size_t bytes, const char* what) {
  const uint64_t site = named_site(what, nullptr, 0, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
  on_access(gaddr, bytes, true, site);
  std::memcpy(gaddr, src, bytes);
}

void async_copy_global_to_shared(uint32_t dst, const void* src, size_t bytes, size_t src_bytes, const char* what) {
  const uint64_t site = named_site(what, nullptr, 0, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
  if (!g_cur) report(std::string(what) + " outside a kernel");
  if (src_bytes > bytes)
    report(std::string(what) + " at " + describe_site(site) + ": src-size " + std::to_string(src_bytes) +
           " exceeds cp-size " + std::to_string(bytes));
  if (dst % bytes != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0))
    report(std::string(what) + " at " + describe_site(site) + ": addresses must be aligned to the copy size " +
           std::to_string(bytes) + " (shared offset " + std::to_string(dst) + ")");
  check_shared_range(dst, bytes, true, site);
  // The copy may write its destination at any moment from issue to the covering wait, so the destination is
  // race-checked as a write here too: a refill issued while other threads may still read the old bytes is a race
  // even though the data itself only lands at the wait.
  shared_access(dst, bytes, true, false, site);
  AsyncCopy c{dst, std::vector<uint8_t>(bytes, 0), site};
  // The source is read at issue (bounds-checked and counted now); the shared bytes change only at the covering wait.
  if (src_bytes > 0) {
    on_access(src, src_bytes, false, site);
    std::memcpy(c.data.data(), src, src_bytes);
  }
  g_cur->uncommitted.push_back(std::move(c));
}

void async_commit_group() {
  if (!g_cur) report("cp.async.commit_group outside a kernel");
  g_cur->groups.push_back(std::move(g_cur->uncommitted));
  g_cur->uncommitted.clear();
}

void async_wait_group(int allowed_pending) {
  const uintptr_t pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  if (!g_cur) report("cp.async.wait_group outside a kernel");
  if (allowed_pending < 0) report("cp.async.wait_group with a negative count");
  Fiber* f = g_cur;
  while (static_cast<int>(f->groups.size()) > allowed_pending) {
    for (AsyncCopy& c : f->groups.front()) {
      const uint64_t site = named_site("cp.async landing at its wait_group", nullptr, 0, pc);
      shared_access(c.dst, c.data.size(), true, false, site);
      std::memcpy(g_arena + c.dst, c.data.data(), c.data.size());
    }
    f->groups.pop_front();
  }
}

namespace {
// A multiply-xorshift hash of a value's bits (one per width), the seed of ulp_offset.
uint64_t mix_bits(uint32_t u) {
  uint32_t h = u * 0x9E3779B1u;
  h ^= h >> 15;
  h *= 0x85EBCA77u;
  return h ^ (h >> 13);
}
uint64_t mix_bits(uint64_t u) {
  uint64_t h = u * 0x9E3779B97F4A7C15ull;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  return h ^ (h >> 32);
}
// How many ulps approx() and approx_exact() move a result, picked by a deterministic hash of its value's bits (Bits:
// their width): mostly the worst case (+-k), one time in four anywhere in [-k, k].
template <class Bits, class T>
int ulp_offset(T value, int k) {
  static_assert(sizeof(Bits) == sizeof(T), "the hash reads the value's own bits");
  Bits u;
  std::memcpy(&u, &value, sizeof u);
  const uint64_t h = mix_bits(u);
  if ((h >> 1) % 4 == 0) return static_cast<int>((h >> 3) % static_cast<uint64_t>(2 * k + 1)) - k;
  return (h & 1u) ? k : -k;
}
}  // namespace

float approx(float exact, float ulps, const char* what) {
  (void)what;
  if (!std::isfinite(exact) || exact == 0.f || ulps < 1.f) return exact;
  const int k = static_cast<int>(std::min(ulps, 1e6f));
  const int off = ulp_offset<uint32_t>(exact, k);
  const uint32_t u = __float_as_uint(exact);
  const uint32_t sign = u & 0x80000000u;
  int64_t mag = static_cast<int64_t>(u & 0x7fffffffu) + off;
  mag = std::max<int64_t>(1, std::min<int64_t>(mag, 0x7f7fffff));  // stay finite and of the same sign
  return __uint_as_float(sign | static_cast<uint32_t>(mag));
}

float approx_exact(double exact, float ulps, const char* what) {
  (void)what;
  const float f0 = static_cast<float>(exact);
  if (!std::isfinite(exact) || !std::isfinite(f0) || exact == 0.0 || ulps < 1.f) return f0;
  const int k = static_cast<int>(std::min(ulps, 1e6f));
  const float a0 = std::fabs(f0);
  const double ulp = static_cast<double>(std::nextafter(a0, INFINITY)) - a0;
  const int off = ulp_offset<uint64_t>(exact, k);
  float f = static_cast<float>(exact + off * ulp);
  // Rounding the moved value may step past the bound: step back toward the exact value.
  if (std::fabs(static_cast<double>(f) - exact) > k * ulp) f = std::nextafter(f, static_cast<float>(exact));
  if (!std::isfinite(f) || (f > 0) != (exact > 0)) return f0;
  return f;
}

uint64_t globaltimer_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

uint64_t atomic_rmw(void* addr, AtomicType type, AtomicOp op, uint64_t operand, uint64_t compare, const char* file,
                    int line) {
  static const char* const names[] = {"atomicAdd", "atomicMax", "atomicMin", "atomicExch", "atomicCAS",
                                      "atomicOr",  "atomicAnd", "atomicXor", "atomicInc"};
  const size_t n = (type == AtomicType::kI64 || type == AtomicType::kU64 || type == AtomicType::kF64) ? 8 : 4;
  if (reinterpret_cast<uintptr_t>(addr) % n)
    report(std::string(names[static_cast<int>(op)]) + " at " + short_path(file) + ":" + std::to_string(line) +
           " on a misaligned address");
  if (g_cur) {
    const uint64_t site = named_site(names[static_cast<int>(op)], file, line);
    if (in_arena(addr)) {
      const uint32_t off = static_cast<uint32_t>(static_cast<char*>(addr) - g_arena);
      check_shared_range(off, n, true, site);
      shared_access(off, n, true, true, site);
    } else if (in_region(addr)) {
      global_access(static_cast<const char*>(addr), n, false, site);
      global_access(static_cast<const char*>(addr), n, true, site);
    }
  }
  uint64_t old = 0;
  std::memcpy(&old, addr, n);
  auto apply = [&](auto cur, auto v, auto cmp) -> decltype(cur) {
    switch (op) {
      case AtomicOp::kAdd: return cur + v;
      case AtomicOp::kMax: return cur > v ? cur : v;
      case AtomicOp::kMin: return cur < v ? cur : v;
      case AtomicOp::kExch: return v;
      case AtomicOp::kCas: return cur == cmp ? v : cur;
      default: break;
    }
    if constexpr (std::is_integral_v<decltype(cur)>) {
      switch (op) {
        case AtomicOp::kOr: return cur | v;
        case AtomicOp::kAnd: return cur & v;
        case AtomicOp::kXor: return cur ^ v;
        case AtomicOp::kInc: return cur >= v ? 0 : cur + 1;
        default: break;
      }
    }
    report(std::string(names[static_cast<int>(op)]) + " is not defined for floating point");
  };
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T cur = from_bits64<T>(old), v = from_bits64<T>(operand), cmp = from_bits64<T>(compare);
    const T r = apply(cur, v, cmp);
    std::memcpy(addr, &r, sizeof(T));
  };
  switch (type) {
    case AtomicType::kI32: run(int32_t{}); break;
    case AtomicType::kU32: run(uint32_t{}); break;
    case AtomicType::kI64: run(int64_t{}); break;
    case AtomicType::kU64: run(uint64_t{}); break;
    case AtomicType::kF32: run(float{}); break;
    case AtomicType::kF64: run(double{}); break;
  }
  return old;
}

// ---- launch -----------------------------------------------------------------------------------------------------
namespace {
size_t smem_optin_limit() { return g_arch >= 90 ? 232448 : 166912; }  // 227 KB (sm_90), 163 KB (sm_80)
constexpr size_t kDefaultDynSmem = 48 * 1024;
}  // namespace

void launch_impl(const void* kernel, dim3 grid, dim3 block, size_t smem, void* stream, LaunchBody body) {
  (void)stream;
  if (!g_error.empty()) {  // an earlier launch of this op reported: the op is already a failure
    g_last_error = cudaErrorLaunchFailure;
    return;
  }
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const auto attr = g_func_max_dyn_smem.find(kernel);
  const size_t allowed = attr == g_func_max_dyn_smem.end() ? kDefaultDynSmem : static_cast<size_t>(attr->second);
  if (smem > allowed || smem > smem_optin_limit()) {
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  if (!g_arena) {
    void* a = mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) throw std::runtime_error("emu: cannot map the shared-memory arena");
    g_arena = static_cast<char*>(a);
    g_shadow.assign(kArenaBytes, Shadow{});
  }
  g_stats.push_back(LaunchStat{kernel, grid, block, smem, 0, 0, {}});
  g_stat = &g_stats.back();
  for (Buffer& b : g_buffers) {
    b.read = b.written = b.unique_read = 0;
    b.seen.clear();
  }
  g_kernel = kernel;
  g_grid = grid;
  g_block = block;
  g_dyn_smem = smem;
  g_smem_limit = smem_optin_limit();
  g_body = body;
  g_blockDim = block;
  g_gridDim = grid;
  g_nthreads = static_cast<int>(threads);
  while (static_cast<int>(g_fibers.size()) < g_nthreads) {
    auto f = std::make_unique<Fiber>();
    f->stack = take_stack();
    g_fibers.push_back(std::move(f));
  }
  // Fibers beyond this block's size are kept (stacks reused) but hidden.
  std::vector<std::unique_ptr<Fiber>> spare;
  while (static_cast<int>(g_fibers.size()) > g_nthreads) {
    spare.push_back(std::move(g_fibers.back()));
    g_fibers.pop_back();
  }
  for (int t = 0; t < g_nthreads; ++t) {
    Fiber* f = g_fibers[t].get();
    f->tid = t;
    f->idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f->vc.assign(g_nthreads, 0);
  }
  g_J.assign(g_nthreads, 0);
  g_open.assign((g_nthreads + 31) / 32, {});
  g_warp_exited.assign((g_nthreads + 31) / 32, 0u);
  g_abort = false;
  g_in_launch = true;
  install_fault_handlers();
  try {
    for (unsigned z = 0; z < grid.z && !g_abort; ++z)
      for (unsigned y = 0; y < grid.y && !g_abort; ++y)
        for (unsigned x = 0; x < grid.x && !g_abort; ++x) run_cta({x, y, z});
  } catch (const std::runtime_error&) {
    // deadlock(): g_error holds the report
  }
  remove_fault_handlers();
  g_func_static_smem[kernel] = g_arena_used > g_dyn_smem ? g_arena_used - g_dyn_smem : 0;
  g_in_launch = false;
  g_cur = nullptr;
  for (auto& o : g_open) {
    for (WarpColl* c : o) free_coll(c);
    o.clear();
  }
  for (auto& f : spare) g_fibers.push_back(std::move(f));
  for (const Buffer& b : g_buffers)
    if (b.read || b.written) g_stat->buffers.emplace_back(b.name, b.read, b.written, b.unique_read);
  if (!g_error.empty()) g_last_error = cudaErrorLaunchFailure;
}

// ---- CUDA runtime stand-ins -------------------------------------------------------------------------------------
cudaError_t get_last_error(bool clear) {
  const cudaError_t e = g_last_error;
  if (clear) g_last_error = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulator report)";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error";
  }
}

cudaError_t func_set_attribute(const void* f, int attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > smem_optin_limit()) return g_last_error = cudaErrorInvalidValue;
    g_func_max_dyn_smem[f] = value;
  }
  return cudaSuccess;
}

cudaError_t func_get_attributes(cudaFuncAttributes* a, const void* f) {
  *a = cudaFuncAttributes{};
  a->numRegs = num_regs_of(f);
  // The static shared memory a kernel declares is known only once it has run (MX_SHARED objects are allocated as
  // the code reaches them): before that, the static limit (48 KiB) is the emulator's upper bound.
  const auto st = g_func_static_smem.find(f);
  a->sharedSizeBytes = st == g_func_static_smem.end() ? kDefaultDynSmem : st->second;
  a->binaryVersion = g_arch;
  a->ptxVersion = g_arch;
  const auto it = g_func_max_dyn_smem.find(f);
  a->maxDynamicSharedSizeBytes = it == g_func_max_dyn_smem.end() ? static_cast<int>(kDefaultDynSmem) : it->second;
  return cudaSuccess;
}

cudaError_t device_get_attribute(int* v, int attr, int device) {
  if (device != 0) return g_last_error = cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMultiProcessorCount: *v = g_arch >= 90 ? 132 : 108; break;
    case cudaDevAttrComputeCapabilityMajor: *v = g_arch / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *v = g_arch % 10; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = g_arch >= 90 ? 233472 : 167936; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = static_cast<int>(smem_optin_limit()); break;
    default: return g_last_error = cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t occupancy(int* n, const void* f, int threads, size_t smem) {
  (void)f;
  if (threads <= 0) return g_last_error = cudaErrorInvalidValue;
  const int per_sm_smem = g_arch >= 90 ? 233472 : 167936;
  int by_threads = 2048 / threads;
  int by_smem = smem ? static_cast<int>(per_sm_smem / (smem + 1024)) : 32;
  *n = std::max(0, std::min({by_threads, by_smem, 32}));
  return cudaSuccess;
}

cudaError_t get_driver_entry_point(const char* symbol, void** fn) {
  *fn = nullptr;
  if (std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0) {  // the emulated encoder (sm90.cpp)
    *fn = reinterpret_cast<void*>(&sm90::tensor_map_encode_tiled);
    return cudaSuccess;
  }
  return cudaErrorNotSupported;
}

// ---- host API (emu_host.h) --------------------------------------------------------------------------------------
void set_arch(int a) {
  if (a != 80 && a != 90) throw std::invalid_argument("emu: arch must be 80 or 90, got " + std::to_string(a));
  g_arch = a;
}
int arch() { return g_arch; }
void set_num_regs(int r) {
  g_num_regs = r;
  g_num_regs_by_name.clear();
}
void set_kernel_num_regs(const std::string& name_part, int r) { g_num_regs_by_name.emplace_back(name_part, r); }

void* buffer_alloc(size_t bytes, const std::string& name, bool fill_nan, size_t misalign) {
  if (!g_region) {
    void* m = mmap(nullptr, g_region_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("emu: cannot reserve the emulation region");
    g_region = static_cast<char*>(m);
  }
  constexpr size_t kAlign = 256, kRedzone = 4096;
  const size_t start = ((g_region_used + kRedzone + kAlign - 1) & ~(kAlign - 1)) + misalign % kAlign;
  const size_t end = start + std::max<size_t>(bytes, 1);
  if (end > g_region_size) throw std::runtime_error("emu: the emulation region is full");
  if (end > g_region_committed) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t new_commit = (end + page - 1) & ~(page - 1);
    if (mprotect(g_region + g_region_committed, new_commit - g_region_committed, PROT_READ | PROT_WRITE) != 0)
      throw std::runtime_error("emu: cannot commit emulation memory");
    g_region_committed = new_commit;
  }
  g_region_used = start + std::max<size_t>(bytes, 1);
  char* p = g_region + start;
  std::memset(p, fill_nan ? 0xFF : 0, bytes);
  g_buffers.push_back(Buffer{p, bytes, name});
  g_last_buffer = nullptr;
  return p;
}

void region_reset() {
  g_buffers.clear();
  g_last_buffer = nullptr;
  if (g_region && g_region_committed) {
    mprotect(g_region, g_region_committed, PROT_NONE);
    madvise(g_region, g_region_committed, MADV_DONTNEED);
  }
  g_region_used = g_region_committed = 0;
}

const std::string& error() { return g_error; }
void clear_error() {
  g_error.clear();
  g_last_error = cudaSuccess;
}

std::string stats_json() {
  auto esc = [](const std::string& s) {
    std::string r;
    for (char c : s) {
      if (c == '"' || c == '\\') r += '\\';
      r += c;
    }
    return r;
  };
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < g_stats.size(); ++i) {
    const LaunchStat& s = g_stats[i];
    o << (i ? "," : "") << "{\"kernel\":\"" << esc(kernel_name(s.kernel)) << "\",\"grid\":[" << s.grid.x << ","
      << s.grid.y << "," << s.grid.z << "],\"block\":[" << s.block.x << "," << s.block.y << "," << s.block.z
      << "],\"smem\":" << s.smem << ",\"bytes_read\":" << s.bytes_read << ",\"bytes_written\":" << s.bytes_written
      << ",\"buffers\":{";
    for (size_t j = 0; j < s.buffers.size(); ++j)
      o << (j ? "," : "") << "\"" << esc(std::get<0>(s.buffers[j])) << "\":[" << std::get<1>(s.buffers[j]) << ","
        << std::get<2>(s.buffers[j]) << "," << std::get<3>(s.buffers[j]) << "]";
    o << "}}";
  }
  o << "]";
  return o.str();
}

void reset_stats() { g_stats.clear(); }
size_t launch_count() { return g_stats.size(); }

}  // namespace emu

// ---- the runtime's internals for the sm_90 primitives (sm90_runtime.h, sm90.cpp) ------------------------------------
namespace emu::rt {
int tid() { return g_cur ? g_cur->tid : -1; }
int nthreads() { return g_nthreads; }
uint64_t cta_serial() { return g_cta_serial; }
int kernel_num_regs() { return num_regs_of(g_kernel); }
uint64_t site(const char* what, uintptr_t pc) { return named_site(what, nullptr, 0, pc); }
std::string describe(uint64_t s) { return describe_site(s); }
void report(const std::string& msg) { ::emu::report(msg); }
void block(const char* what, uint64_t s) {
  if (!g_cur) ::emu::report(std::string(what) + " outside a kernel");
  block_current(Wait::kAsync, s, what);
}
void wake(int t) {
  Fiber* f = g_fibers[t].get();
  if (f->blocked && f->wait == Wait::kAsync) make_ready(f);
}
void knowledge(std::vector<uint32_t>& out) {
  out.resize(g_nthreads);
  for (int t = 0; t < g_nthreads; ++t) out[t] = std::max(g_J[t], g_cur->vc[t]);
}
void acquire(const std::vector<uint32_t>& v) {
  for (int t = 0; t < g_nthreads && t < static_cast<int>(v.size()); ++t) g_cur->vc[t] = std::max(g_cur->vc[t], v[t]);
}
void tick() { ++g_cur->vc[g_cur->tid]; }
uint32_t clock_of(int t) { return g_cur->vc[t]; }
void shared_access(uint32_t off, size_t n, bool is_write, bool atomic, uint64_t s) {
  check_shared_range(off, n, is_write, s);
  ::emu::shared_access(off, n, is_write, atomic, s);
}
char* arena() { return g_arena; }
void global_access(const void* p, size_t n, bool is_write, uint64_t s) { on_access(p, n, is_write, s); }
void set_generic_write_hook(void (*h)(uint32_t, size_t)) { g_generic_write_hook = h; }
void set_thread_exit_hook(void (*h)(int)) { g_thread_exit_hook = h; }
}  // namespace emu::rt

// ---- ThreadSanitizer instrumentation hooks (kernel code is compiled with -fsanitize=thread, not linked with it) ----
#define EMU_RET_PC reinterpret_cast<uint64_t>(__builtin_return_address(0))
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
#define EMU_TSAN_RW(n)                                                                                  \
  void __tsan_read##n(void* a) { emu::on_access(a, n, false, EMU_RET_PC); }                             \
  void __tsan_write##n(void* a) { emu::on_access(a, n, true, EMU_RET_PC); }                             \
  void __tsan_unaligned_read##n(void* a) { emu::on_access(a, n, false, EMU_RET_PC); }                   \
  void __tsan_unaligned_write##n(void* a) { emu::on_access(a, n, true, EMU_RET_PC); }                   \
  void __tsan_volatile_read##n(void* a) { emu::on_access(a, n, false, EMU_RET_PC); }                    \
  void __tsan_volatile_write##n(void* a) { emu::on_access(a, n, true, EMU_RET_PC); }
EMU_TSAN_RW(1)
EMU_TSAN_RW(2)
EMU_TSAN_RW(4)
EMU_TSAN_RW(8)
EMU_TSAN_RW(16)
void __tsan_read_range(void* a, unsigned long n) { emu::on_access(a, n, false, EMU_RET_PC); }
void __tsan_write_range(void* a, unsigned long n) { emu::on_access(a, n, true, EMU_RET_PC); }

// std::atomic in kernel files' host code (e.g. cached occupancy): plain atomic operations, never shared or global.
#define EMU_TSAN_ATOMIC(bits, T)                                                                                      \
  T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }             \
  void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }             \
  T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }    \
  T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }    \
  T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }    \
  T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }    \
  T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }      \
  T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }    \
  T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); }  \
  int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                             \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                           \
  }                                                                                                                   \
  int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                               \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                           \
  }                                                                                                                   \
  T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                                   \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                                 \
    return c;                                                                                                         \
  }
EMU_TSAN_ATOMIC(8, uint8_t)
EMU_TSAN_ATOMIC(16, uint16_t)
EMU_TSAN_ATOMIC(32, uint32_t)
EMU_TSAN_ATOMIC(64, uint64_t)
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
}
