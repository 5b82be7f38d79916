// The emulated Hopper (sm_90a) instructions (sm90.h), on the runtime's fibers, shared arena and race detector
// (runtime.cpp, through sm90_runtime.h). Compiled without instrumentation, like runtime.cpp. Semantics are the PTX
// ISA's and the CUDA driver API's; what each models, and what it reports instead of hiding:
//
// mbarrier     init (count 1 .. 2^20-1), arrive, arrive.expect_tx, complete_tx (by TMA), try_wait.parity. A phase
//              completes when its pending arrivals and its transaction count are both zero; try_wait.parity(P) is
//              true once the phase of parity P has completed (a fresh barrier counts parity 1 as completed).
//              try_wait suspends the thread until the barrier's phase changes (the ISA lets try_wait suspend; here
//              it always does, so a spin-wait loop costs nothing and a barrier that never completes is a deadlock
//              report naming the wait). Happens-before: arrivals and complete_tx release the arriving thread's
//              clock into the phase; a wait that sees the phase complete acquires them. The barrier's 8 bytes are
//              written at init and checked at every use (overwritten or uninitialised barriers are reported), and
//              an arrival beyond the count in a phase is reported.
// %globaltimer (the kernels' watchdogs): since try_wait only returns once the phase completed (or the CTA is
//              reported as deadlocked), a watchdog loop never polls the timer long enough to fire: the emulator
//              decides hangs by deadlock detection, deterministically, never by wall time.
// cp.async.bulk.tensor (tile mode, rank 1..5): the tensor map is the emulated cuTensorMapEncodeTiled's (dims,
//              strides, box, element size, swizzle, out-of-bounds fill; its documented argument checks); the copy
//              reads the box's in-bounds part from global memory (bounds-checked), fills the rest (zeros, or NaN
//              with FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA), writes it to shared memory with the map's swizzle applied
//              to the shared address bits (so a destination that is not aligned to the swizzle atom lands as it
//              would on the device), and completes the whole box's bytes as transactions on its mbarrier.
// fence.proxy.async: generic-proxy writes to shared memory (st.shared, plain stores, cp.async landings) must be
//              followed by a fence.proxy.async of the writing thread that happens before an async-proxy read
//              (wgmma operands) of the same bytes; a read that finds no such fence is reported.
// wgmma        .mma_async m64nNk16 f32 += bf16/f16 x bf16/f16, A from shared memory or registers, B from shared
//              memory, descriptors decoded per the ISA (start address, LBO, SBO, swizzle mode 0/1/2/3; base offset
//              0 only), K-major or MN-major operands; fence / commit_group / wait_group. Operands are read and
//              the accumulators written when the wait_group that retires the group runs (the latest moment the
//              hardware may use them): until then the accumulator registers hold their old values (stale reads
//              give stale results), shared-memory operands are read then (a slot overwritten before the wait gives
//              wrong results and a race report), and A registers changed before the wait are reported. A wgmma
//              issued with no wgmma.fence since the thread's last wait_group, different operands across the lanes
//              of a warp, and a thread that exits with groups not waited for are reported. wait_group is a warp
//              rendezvous (.sync.aligned) after which every lane of the warp knows the operand reads are done.
// setmaxnreg   a register pool per CTA of threads x the kernel's numRegs (cudaFuncGetAttributes, settable in the
//              emulator): .dec returns registers to the pool, .inc takes them and waits until the pool holds
//              enough, so a split that does not balance is a deadlock report naming setmaxnreg.inc.
// bar.sync / bar.arrive id, threads: named barriers 1..15 (0 is __syncthreads' barrier), per-thread counting; the
//              waiting threads acquire every participant's clock. A thread count that differs within a phase is
//              reported.
#define MIXTRAL_EMU 1
#include "sm90.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "sm90_runtime.h"

namespace emu::sm90 {
namespace {

constexpr size_t kArenaBytes = 256 * 1024;  // runtime.cpp's arena size
constexpr uint64_t kBarMagic = 0x4d42415255454d55ull;  // the bytes an initialised emulated mbarrier holds

#define EMU_PC reinterpret_cast<uintptr_t>(__builtin_return_address(0))

std::string hex(uint64_t v) {
  char b[32];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

void join(std::vector<uint32_t>& into, const std::vector<uint32_t>& v) {
  if (into.size() < v.size()) into.resize(v.size(), 0);
  for (size_t i = 0; i < v.size(); ++i) into[i] = std::max(into[i], v[i]);
}

struct MBar {
  uint32_t count = 0;
  int64_t pending = 0, tx = 0;
  uint64_t phase = 0;                  // completed phases
  std::vector<uint32_t> rel, done;     // releases into the current phase; cumulative at the last completion
  std::vector<int> waiters;
  uint64_t init_site = 0;
};

struct NamedBar {
  uint32_t count = 0, arrived = 0;
  uint64_t phase = 0;
  std::vector<uint32_t> rel, done;
  std::vector<int> waiters;
  uint64_t site = 0;
};

struct WgmmaOp {
  int n = 0;
  WgmmaType type = WgmmaType::kBF16;
  uint64_t desc_a = 0, desc_b = 0;
  bool rs = false, scale_d = true;
  int scale_a = 1, scale_b = 1, trans_a = 0, trans_b = 0;
  uint64_t site = 0;
  float* d[32] = {};
  const uint32_t* a[32] = {};
  uint32_t a_snap[32][4] = {};
};

struct WarpWgmma {
  std::map<int, std::vector<WgmmaOp>> groups;  // group index -> its ops (lanes fill in their pointers)
  std::map<int, int> group_size;               // ops per group, fixed by the first lane that commits it
  int committed[32] = {}, issued[32] = {};
  bool fenced[32] = {};
  int retired = 0;
};

struct Cta {
  uint64_t serial = ~uint64_t{0};
  int nthreads = 0;
  std::unordered_map<uint32_t, MBar> bars;
  NamedBar named[16];
  std::vector<WarpWgmma> warps;
  // setmaxnreg
  int64_t reg_free = 0;
  std::vector<int> regs;
  std::vector<int> reg_waiters;
  // fence.proxy.async: per thread the clock at each fence; per shared byte the last generic writer (tid + 1, 0:
  // none or an async-proxy write) and how many fences that thread had made before the write.
  std::vector<std::vector<uint32_t>> fences;
  std::vector<uint16_t> gw_tid;
  std::vector<uint32_t> gw_seq;
  bool any_generic = false;
};

Cta g_cta;

void on_generic_write(uint32_t off, size_t n);
void on_thread_exit(int tid);

// Installed when the library loads: generic writes must be tracked from a kernel's first store on, before its first
// sm_90 instruction (runtime.cpp's hook pointers are constant-initialised, so this static initialiser may set them).
[[maybe_unused]] const bool g_hooks = [] {
  rt::set_generic_write_hook(&on_generic_write);
  rt::set_thread_exit_hook(&on_thread_exit);
  return true;
}();

Cta& cta() {
  if (g_cta.serial != rt::cta_serial()) {
    Cta& c = g_cta;
    c.serial = rt::cta_serial();
    c.nthreads = rt::nthreads();
    c.bars.clear();
    for (NamedBar& b : c.named) b = NamedBar{};
    c.warps.assign((c.nthreads + 31) / 32, WarpWgmma{});
    c.regs.assign(c.nthreads, -1);  // numRegs, read at the first setmaxnreg
    c.reg_free = 0;
    c.reg_waiters.clear();
    c.fences.assign(c.nthreads, {});
    if (c.gw_tid.size() != kArenaBytes) {
      c.gw_tid.assign(kArenaBytes, 0);
      c.gw_seq.assign(kArenaBytes, 0);
    } else if (c.any_generic) {
      std::fill(c.gw_tid.begin(), c.gw_tid.end(), 0);
    }
    c.any_generic = false;
  }
  return g_cta;
}

void on_generic_write(uint32_t off, size_t n) {
  const int t = rt::tid();
  if (t < 0) return;
  Cta& c = cta();
  if (off + n > kArenaBytes) return;
  const uint32_t seq = static_cast<uint32_t>(c.fences[t].size());
  for (size_t i = 0; i < n; ++i) {
    c.gw_tid[off + i] = static_cast<uint16_t>(t + 1);
    c.gw_seq[off + i] = seq;
  }
  c.any_generic = true;
}

// An async-proxy read of [off, off + n) by the current thread, whose knowledge of the other threads' clocks is K.
void check_proxy(Cta& c, uint32_t off, size_t n, const std::vector<uint32_t>& K, const char* what, uint64_t site) {
  if (!c.any_generic) return;
  for (size_t i = 0; i < n; ++i) {
    const int w = c.gw_tid[off + i];
    if (!w) continue;
    const int u = w - 1;
    const uint32_t e = c.gw_seq[off + i];
    const bool fenced = e < c.fences[u].size() && c.fences[u][e] <= K[u];
    if (!fenced)
      rt::report(rt::describe(site) + " reads shared byte " + std::to_string(off + i) +
                 " through the async proxy, but thread " + std::to_string(u) +
                 " wrote it through the generic proxy (st.shared, a plain store or a cp.async landing) with no "
                 "fence.proxy.async after the write that is ordered before this read: the read may miss the write");
  }
}

// ---- mbarrier -----------------------------------------------------------------------------------------------------
MBar& bar_at(Cta& c, uint32_t bar, const char* what, uint64_t site) {
  auto it = c.bars.find(bar);
  if (it == c.bars.end())
    rt::report(rt::describe(site) + " on shared offset " + std::to_string(bar) +
               ", which holds no initialised mbarrier (mbarrier.init first)");
  uint64_t v;
  std::memcpy(&v, rt::arena() + bar, 8);
  if (v != kBarMagic)
    rt::report(rt::describe(site) + ": the mbarrier at shared offset " +
               std::to_string(bar) + " (initialised " + rt::describe(it->second.init_site) +
               ") was overwritten by other data");
  return it->second;
}

void complete_if_done(MBar& b) {
  if (b.pending != 0 || b.tx != 0) return;
  join(b.done, b.rel);
  std::fill(b.rel.begin(), b.rel.end(), 0u);
  ++b.phase;
  b.pending = b.count;
  for (int t : b.waiters) rt::wake(t);
  b.waiters.clear();
}

void release_into(std::vector<uint32_t>& rel) {
  std::vector<uint32_t> K;
  rt::knowledge(K);
  join(rel, K);
  rt::tick();
}

}  // namespace

void mbar_init(uint32_t bar, uint32_t count) {
  const uint64_t site = rt::site("mbarrier.init", EMU_PC);
  Cta& c = cta();
  if (bar % 8) rt::report(rt::describe(site) + ": shared offset " + std::to_string(bar) +
                          " is not 8-byte aligned");
  if (count < 1 || count > (1u << 20) - 1)
    rt::report(rt::describe(site) + ": count " + std::to_string(count) +
               " outside 1 .. 2^20-1");
  rt::shared_access(bar, 8, true, false, site);
  std::memcpy(rt::arena() + bar, &kBarMagic, 8);
  MBar& b = c.bars[bar];
  b = MBar{};
  b.count = count;
  b.pending = count;
  b.init_site = site;
  b.rel.assign(c.nthreads, 0);
  b.done.assign(c.nthreads, 0);
}

void mbar_arrive(uint32_t bar, uint32_t expect_tx_bytes) {
  const char* what = expect_tx_bytes ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive";
  const uint64_t site = rt::site(what, EMU_PC);
  Cta& c = cta();
  MBar& b = bar_at(c, bar, what, site);
  rt::shared_access(bar, 8, true, true, site);
  if (expect_tx_bytes > (1u << 20) - 1)
    rt::report(rt::describe(site) + ": tx count " + std::to_string(expect_tx_bytes) +
               " outside 0 .. 2^20-1");
  b.tx += expect_tx_bytes;
  release_into(b.rel);
  if (b.pending <= 0)
    rt::report(rt::describe(site) + ": more arrivals than the mbarrier's count (" +
               std::to_string(b.count) + ") in one phase (the phase waits only for its transactions)");
  --b.pending;
  complete_if_done(b);
}

bool mbar_try_wait_parity(uint32_t bar, uint32_t parity) {
  const uint64_t site = rt::site("mbarrier.try_wait.parity", EMU_PC);
  Cta& c = cta();
  MBar* b = &bar_at(c, bar, "mbarrier.try_wait.parity", site);
  rt::shared_access(bar, 8, false, true, site);
  // Phase of parity P complete <=> the current (incomplete) phase's parity differs from P.
  if ((b->phase & 1u) == (parity & 1u)) {
    b->waiters.push_back(rt::tid());
    rt::block("mbarrier.try_wait.parity", site);
    b = &bar_at(cta(), bar, "mbarrier.try_wait.parity", site);
    if ((b->phase & 1u) == (parity & 1u)) return false;  // two phases passed meanwhile: the caller polls again
  }
  rt::acquire(b->done);
  return true;
}

void fence_mbarrier_init() { (void)cta(); }

void fence_proxy_async() {
  Cta& c = cta();
  const int t = rt::tid();
  c.fences[t].push_back(rt::clock_of(t));
}

// ---- TMA ----------------------------------------------------------------------------------------------------------
namespace {
struct TMap {
  uint64_t magic;
  uint64_t base;
  uint64_t dims[5];
  uint64_t strides[5];  // bytes; strides[0] is the element size (not stored)
  uint16_t box[5];
  uint8_t rank, elem, swizzle, interleave, oob, dtype;
};
// Stored without strides[0]: magic, base, dims, strides[1..4], box, the small fields.
constexpr size_t kTMapBytes = 8 + 8 + 40 + 32 + 10 + 6;
static_assert(kTMapBytes <= sizeof(CUtensorMap), "the emulated tensor map fits CUtensorMap");
void store_map(CUtensorMap* map, const TMap& m) {
  char* p = reinterpret_cast<char*>(map);
  std::memset(p, 0, sizeof(CUtensorMap));
  std::memcpy(p, &m.magic, 8);
  std::memcpy(p + 8, &m.base, 8);
  std::memcpy(p + 16, m.dims, 40);
  std::memcpy(p + 56, m.strides + 1, 32);
  std::memcpy(p + 88, m.box, 10);
  std::memcpy(p + 98, &m.rank, 6);
}
TMap load_map(const CUtensorMap* map) {
  const char* p = reinterpret_cast<const char*>(map);
  TMap m{};
  std::memcpy(&m.magic, p, 8);
  std::memcpy(&m.base, p + 8, 8);
  std::memcpy(m.dims, p + 16, 40);
  std::memcpy(m.strides + 1, p + 56, 32);
  std::memcpy(m.box, p + 88, 10);
  std::memcpy(&m.rank, p + 98, 6);
  m.strides[0] = m.elem;
  return m;
}
constexpr uint64_t kMapMagic = 0x50414d54554d45ull;

int elem_size(CUtensorMapDataType t) {
  switch (t) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32:
    case CU_TENSOR_MAP_DATA_TYPE_INT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ: return 4;
    case CU_TENSOR_MAP_DATA_TYPE_UINT64:
    case CU_TENSOR_MAP_DATA_TYPE_INT64:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT64: return 8;
  }
  return 0;
}

bool is_float(CUtensorMapDataType t) {
  return t == CU_TENSOR_MAP_DATA_TYPE_FLOAT16 || t == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 ||
         t == CU_TENSOR_MAP_DATA_TYPE_FLOAT64 || t == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ||
         t == CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ || t == CU_TENSOR_MAP_DATA_TYPE_TFLOAT32 ||
         t == CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ;
}

uint32_t swizzle_span(uint32_t mode) {  // CUtensorMapSwizzle -> bytes (0: none)
  return mode == CU_TENSOR_MAP_SWIZZLE_128B ? 128 : mode == CU_TENSOR_MAP_SWIZZLE_64B ? 64
                                                 : mode == CU_TENSOR_MAP_SWIZZLE_32B ? 32 : 0;
}

// The swizzle patterns (CUDA programming guide, TMA swizzle; the same XOR the wgmma descriptors' modes name): the
// 16-byte chunk index inside a span takes the XOR of the address bits just above the 128-byte row.
uint32_t swizzle_addr(uint32_t addr, uint32_t span) {
  switch (span) {
    case 128: return addr ^ (((addr >> 7) & 7u) << 4);
    case 64: return addr ^ (((addr >> 7) & 3u) << 4);
    case 32: return addr ^ (((addr >> 7) & 1u) << 4);
    default: return addr;
  }
}
}  // namespace

CUresult tensor_map_encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* global_address,
                                 const cuuint64_t* global_dim, const cuuint64_t* global_strides,
                                 const cuuint32_t* box_dim, const cuuint32_t* element_strides,
                                 CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                 CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill oob_fill) {
  (void)l2;
  // cuTensorMapEncodeTiled's documented requirements.
  const int es = elem_size(type);
  if (!map || es == 0 || rank < 1 || rank > 5) return CUDA_ERROR_INVALID_VALUE;
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) return CUDA_ERROR_NOT_SUPPORTED;  // not used: not emulated
  if (reinterpret_cast<uintptr_t>(global_address) % 16) return CUDA_ERROR_INVALID_VALUE;
  TMap m{};
  m.magic = kMapMagic;
  m.base = reinterpret_cast<uint64_t>(global_address);
  m.rank = static_cast<uint8_t>(rank);
  m.elem = static_cast<uint8_t>(es);
  m.swizzle = static_cast<uint8_t>(swizzle);
  m.interleave = static_cast<uint8_t>(interleave);
  m.oob = static_cast<uint8_t>(oob_fill);
  m.dtype = static_cast<uint8_t>(type);
  if (oob_fill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA && !is_float(type)) return CUDA_ERROR_INVALID_VALUE;
  m.strides[0] = static_cast<uint64_t>(es);
  for (uint32_t i = 0; i < rank; ++i) {
    if (global_dim[i] == 0 || global_dim[i] > (uint64_t{1} << 32)) return CUDA_ERROR_INVALID_VALUE;
    if (box_dim[i] == 0 || box_dim[i] > 256) return CUDA_ERROR_INVALID_VALUE;
    if (element_strides[i] == 0 || element_strides[i] > 8) return CUDA_ERROR_INVALID_VALUE;
    if (element_strides[i] != 1) return CUDA_ERROR_NOT_SUPPORTED;  // not used: not emulated
    m.dims[i] = global_dim[i];
    m.box[i] = static_cast<uint16_t>(box_dim[i]);
    if (i > 0) {
      const uint64_t s = global_strides[i - 1];
      if (s % 16 || s >= (uint64_t{1} << 40)) return CUDA_ERROR_INVALID_VALUE;
      m.strides[i] = s;
    }
  }
  if ((box_dim[0] * static_cast<uint64_t>(es)) % 16) return CUDA_ERROR_INVALID_VALUE;
  const uint32_t span = swizzle_span(m.swizzle);
  if (span && box_dim[0] * static_cast<uint64_t>(es) > span) return CUDA_ERROR_INVALID_VALUE;
  store_map(map, m);
  return CUDA_SUCCESS;
}

void tma_load(uint32_t dst, const CUtensorMap* map, const int* coords, int rank, uint32_t bar) {
  const uint64_t site = rt::site("cp.async.bulk.tensor", EMU_PC);
  Cta& c = cta();
  const TMap m = load_map(map);
  if (m.magic != kMapMagic)
    rt::report(rt::describe(site) + ": the tensor map was not made by "
               "cuTensorMapEncodeTiled (or was overwritten)");
  if (static_cast<int>(m.rank) != rank)
    rt::report(rt::describe(site) + ": a " + std::to_string(rank) +
               "d copy with a tensor map of rank " + std::to_string(m.rank));
  if (dst % 128)
    rt::report(rt::describe(site) + ": shared destination offset " + std::to_string(dst) +
               " is not 128-byte aligned");
  MBar& b = bar_at(c, bar, "cp.async.bulk.tensor", site);
  const uint32_t span = swizzle_span(m.swizzle);
  const uint64_t row_bytes = uint64_t{m.box[0]} * m.elem;
  uint64_t rows = 1;
  for (uint32_t i = 1; i < m.rank; ++i) rows *= m.box[i];
  const uint64_t total = row_bytes * rows;
  std::vector<uint8_t> img(total);
  uint8_t fill[8];
  std::memset(fill, 0, sizeof fill);
  if (m.oob == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA) {
    const uint64_t nan = m.elem == 2 ? (m.dtype == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ? 0x7fc0 : 0x7e00)
                                     : m.elem == 4 ? 0x7fc00000u : 0x7ff8000000000000ull;
    std::memcpy(fill, &nan, m.elem);
  }
  for (uint64_t r = 0; r < rows; ++r) {
    // Outer coordinates of box row r.
    int64_t off = 0;
    bool in = true;
    uint64_t rem = r;
    for (uint32_t i = 1; i < m.rank; ++i) {
      const int64_t ci = static_cast<int64_t>(coords[i]) + static_cast<int64_t>(rem % m.box[i]);
      rem /= m.box[i];
      if (ci < 0 || ci >= static_cast<int64_t>(m.dims[i])) in = false;
      off += ci * static_cast<int64_t>(m.strides[i]);
    }
    uint8_t* row = img.data() + r * row_bytes;
    for (uint32_t x = 0; x < m.box[0]; ++x) std::memcpy(row + x * m.elem, fill, m.elem);
    if (!in) continue;
    const int64_t x0 = std::max<int64_t>(coords[0], 0);
    const int64_t x1 = std::min<int64_t>(static_cast<int64_t>(coords[0]) + m.box[0], static_cast<int64_t>(m.dims[0]));
    if (x1 <= x0) continue;
    const char* src = reinterpret_cast<const char*>(m.base) + off + x0 * m.elem;
    const size_t n = static_cast<size_t>(x1 - x0) * m.elem;
    rt::global_access(src, n, false, site);
    std::memcpy(row + (x0 - coords[0]) * m.elem, src, n);
  }
  // Land in 16-byte chunks at their swizzled addresses: async-proxy writes by this thread.
  for (uint64_t o = 0; o < total; o += 16) {
    const uint32_t a = swizzle_addr(dst + static_cast<uint32_t>(o), span);
    rt::shared_access(a, 16, true, false, site);
    std::memcpy(rt::arena() + a, img.data() + o, 16);
    for (int i = 0; i < 16; ++i) c.gw_tid[a + i] = 0;
  }
  b.tx -= static_cast<int64_t>(total);
  release_into(b.rel);
  complete_if_done(b);
}

// ---- wgmma --------------------------------------------------------------------------------------------------------
namespace {
struct Desc {
  uint32_t start, lbo, sbo, span;
};

Desc decode(uint64_t d, const char* what, uint64_t site) {
  Desc r;
  r.start = static_cast<uint32_t>(d & 0x3fff) << 4;
  r.lbo = static_cast<uint32_t>((d >> 16) & 0x3fff) << 4;
  r.sbo = static_cast<uint32_t>((d >> 32) & 0x3fff) << 4;
  const uint32_t base_offset = static_cast<uint32_t>((d >> 49) & 7);
  const uint32_t mode = static_cast<uint32_t>(d >> 62);
  r.span = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;
  if (base_offset != 0)
    rt::report(rt::describe(site) + ": descriptor " + hex(d) +
               " has a matrix base offset (not emulated: the kernels align every swizzle atom)");
  return r;
}

// Shared address of 16-byte chunk (mn0 .. mn0+7 at k, MN-major; or k0 .. k0+7 at mn, K-major) of a 16-bit operand.
// K-major, swizzled:   ((8, m), (T, 2k)) : ((span, SBO), (1, T)) in the span's rows; no swizzle: core matrices
//                      of 8 rows x 16 bytes, SBO between 8-row groups along MN, LBO between them along K.
// MN-major, swizzled:  span / 2 MN elements per row, LBO between such atoms along MN, 8 K rows of `span` bytes,
//                      SBO between 8-row groups along K.
uint32_t chunk_addr(const Desc& d, bool mn_major, int mn, int k) {
  uint32_t a;
  if (!mn_major) {
    if (d.span) a = d.start + (mn / 8) * d.sbo + (mn % 8) * d.span + k * 2;
    else a = d.start + (mn / 8) * d.sbo + (mn % 8) * 16 + (k / 8) * d.lbo + (k % 8) * 2;
  } else {
    const int e = static_cast<int>(d.span / 2);
    a = d.start + (mn / e) * d.lbo + (mn % e) * 2 + (k / 8) * d.sbo + (k % 8) * d.span;
  }
  return swizzle_addr(a, d.span);
}

float to_f(uint16_t h, WgmmaType t) { return t == WgmmaType::kBF16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h); }

// Reads a [rows][16] operand (rows mn0 .. mn0+rows-1) from shared memory as the current thread's async-proxy read.
void read_operand(Cta& c, uint64_t desc, bool mn_major, int mn0, int rows, WgmmaType t, float* out,
                  const std::vector<uint32_t>& K, const char* what, uint64_t site) {
  const Desc d = decode(desc, what, site);
  if (mn_major && !d.span)
    rt::report(rt::describe(site) + ": an MN-major operand without swizzle "
               "(not emulated: the kernels do not use it)");
  uint16_t v[8];
  if (!mn_major) {
    for (int r = 0; r < rows; ++r)
      for (int k0 = 0; k0 < 16; k0 += 8) {
        const uint32_t a = chunk_addr(d, false, mn0 + r, k0);
        rt::shared_access(a, 16, false, false, site);
        check_proxy(c, a, 16, K, what, site);
        std::memcpy(v, rt::arena() + a, 16);
        for (int i = 0; i < 8; ++i) out[r * 16 + k0 + i] = to_f(v[i], t);
      }
  } else {
    for (int k = 0; k < 16; ++k)
      for (int r0 = 0; r0 < rows; r0 += 8) {
        const uint32_t a = chunk_addr(d, true, mn0 + r0, k);
        rt::shared_access(a, 16, false, false, site);
        check_proxy(c, a, 16, K, what, site);
        std::memcpy(v, rt::arena() + a, 16);
        for (int i = 0; i < 8; ++i) out[(r0 + i) * 16 + k] = to_f(v[i], t);
      }
  }
}

// Executes one wgmma for the 16 rows of warp `w` (warp within the warpgroup: rows 16 (w % 4) ..) and writes every
// lane's accumulators.
void execute(Cta& c, int warp, WgmmaOp& op, const std::vector<uint32_t>& K) {
  const int wi = warp % 4;
  const char* what = "wgmma.mma_async";
  float A[16 * 16];
  std::vector<float> B(static_cast<size_t>(op.n) * 16);
  if (op.rs) {
    for (int l = 0; l < 32; ++l) {
      if (std::memcmp(op.a[l], op.a_snap[l], 16) != 0)
        rt::report(rt::describe(op.site) + ": lane " + std::to_string(l) + " of warp " +
                   std::to_string(warp) + " changed its A registers before the wgmma.wait_group that retires it");
      const int g = l / 4, t = l % 4;
      for (int q = 0; q < 4; ++q) {
        const int row = g + 8 * (q & 1), col = 2 * t + 8 * (q >> 1);
        A[row * 16 + col] = to_f(static_cast<uint16_t>(op.a_snap[l][q] & 0xffff), op.type);
        A[row * 16 + col + 1] = to_f(static_cast<uint16_t>(op.a_snap[l][q] >> 16), op.type);
      }
    }
  } else {
    read_operand(c, op.desc_a, op.trans_a != 0, 16 * wi, 16, op.type, A, K, what, op.site);
  }
  read_operand(c, op.desc_b, op.trans_b != 0, 0, op.n, op.type, B.data(), K, what, op.site);
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    float* d = op.d[l];
    for (int j = 0; j < op.n / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 8 * j + 2 * t + (e & 1);
        double s = 0.0;
        for (int k = 0; k < 16; ++k)
          s += static_cast<double>(A[row * 16 + k]) * op.scale_a * static_cast<double>(B[col * 16 + k]) * op.scale_b;
        const double acc = op.scale_d ? static_cast<double>(d[4 * j + e]) : 0.0;
        d[4 * j + e] = static_cast<float>(acc + s);
      }
  }
}
}  // namespace

void wgmma_issue(float* d, int n, WgmmaType type, uint64_t desc_a, const uint32_t* a, uint64_t desc_b, bool scale_d,
                 int scale_a, int scale_b, int trans_a, int trans_b) {
  const uint64_t site = rt::site("wgmma.mma_async", EMU_PC);
  Cta& c = cta();
  const int t = rt::tid(), warp = t / 32, lane = t % 32;
  WarpWgmma& w = c.warps[warp];
  if (n % 8 || n < 8 || n > 256) rt::report(rt::describe(site) + ": N = " + std::to_string(n));
  if (!w.fenced[lane])
    rt::report(rt::describe(site) + ": thread " + std::to_string(t) +
               " issues a wgmma with no wgmma.fence since its last wgmma.wait_group (or the kernel start): the "
               "accumulator / A registers may not be ordered with the ordinary accesses before it");
  const int g = w.committed[lane], k = w.issued[lane]++;
  auto& ops = w.groups[g];
  if (k == static_cast<int>(ops.size())) {
    WgmmaOp op;
    op.n = n;
    op.type = type;
    op.desc_a = desc_a;
    op.desc_b = desc_b;
    op.rs = a != nullptr;
    op.scale_d = scale_d;
    op.scale_a = scale_a;
    op.scale_b = scale_b;
    op.trans_a = trans_a;
    op.trans_b = trans_b;
    op.site = site;
    ops.push_back(op);
  }
  WgmmaOp& op = ops[k];
  if (op.n != n || op.type != type || op.desc_b != desc_b || op.rs != (a != nullptr) ||
      (!op.rs && op.desc_a != desc_a) || op.scale_d != scale_d || op.trans_a != trans_a || op.trans_b != trans_b ||
      op.scale_a != scale_a || op.scale_b != scale_b)
    rt::report(rt::describe(site) + ": lane " + std::to_string(lane) + " of warp " +
               std::to_string(warp) + " issues wgmma #" + std::to_string(k) + " of group " + std::to_string(g) +
               " with other operands (descriptors, shape, scale-d) than lanes before it");
  op.d[lane] = d;
  if (a) {
    op.a[lane] = a;
    std::memcpy(op.a_snap[lane], a, 16);
  }
}

void wgmma_fence() {
  Cta& c = cta();
  const int t = rt::tid();
  c.warps[t / 32].fenced[t % 32] = true;
}

void wgmma_commit() {
  const uint64_t site = rt::site("wgmma.commit_group", EMU_PC);
  Cta& c = cta();
  const int t = rt::tid(), lane = t % 32;
  WarpWgmma& w = c.warps[t / 32];
  const int g = w.committed[lane];
  const auto it = w.group_size.find(g);
  if (it == w.group_size.end()) {
    w.group_size[g] = w.issued[lane];
    w.groups[g];  // an empty group is legal
  } else if (it->second != w.issued[lane]) {
    rt::report(rt::describe(site) + ": lane " + std::to_string(lane) + " commits " +
               std::to_string(w.issued[lane]) + " wgmma into group " + std::to_string(g) + ", other lanes of its warp " +
               std::to_string(it->second));
  }
  ++w.committed[lane];
  w.issued[lane] = 0;
}

void wgmma_wait(int pending) {
  const uint64_t site = rt::site("wgmma.wait_group", EMU_PC);
  const int t = rt::tid(), warp = t / 32, lane = t % 32;
  int mine = cta().warps[warp].committed[lane];
  int all[32];
  // .sync.aligned: the whole warp executes it together.
  warp_exchange_bytes(0xffffffffu, &mine, sizeof mine, all, "wgmma.wait_group", nullptr, 0);
  Cta& c = cta();
  WarpWgmma& w = c.warps[warp];
  for (int l = 0; l < 32; ++l)
    if (all[l] != mine)
      rt::report(rt::describe(site) + ": lanes of warp " + std::to_string(warp) +
                 " have committed different numbers of wgmma groups (" + std::to_string(mine) + " and " +
                 std::to_string(all[l]) + ")");
  const int target = mine - pending;
  if (w.retired < target) {
    std::vector<uint32_t> K;
    rt::knowledge(K);
    while (w.retired < target) {
      auto it = w.groups.find(w.retired);
      if (it != w.groups.end()) {
        for (WgmmaOp& op : it->second) execute(c, warp, op, K);
        w.groups.erase(it);
      }
      w.group_size.erase(w.retired);
      ++w.retired;
    }
  }
  w.fenced[lane] = false;
  // After the wait every lane knows the operand reads are done (the retiring lane made them).
  syncwarp(__FILE__, __LINE__, 0xffffffffu);
}

namespace {
void on_thread_exit(int tid) {
  Cta& c = cta();
  if (c.warps.empty()) return;
  WarpWgmma& w = c.warps[tid / 32];
  const int lane = tid % 32;
  if (w.committed[lane] > w.retired || w.issued[lane] > 0)
    rt::report("thread " + std::to_string(tid) + " exits with " +
               std::to_string(w.committed[lane] - w.retired + (w.issued[lane] > 0 ? 1 : 0)) +
               " wgmma group(s) not retired by a wgmma.wait_group: their accumulators were never valid");
}
}  // namespace

// ---- setmaxnreg ---------------------------------------------------------------------------------------------------
void setmaxnreg(bool inc, int regs) {
  const char* what = inc ? "setmaxnreg.inc" : "setmaxnreg.dec";
  const uint64_t site = rt::site(what, EMU_PC);
  Cta& c = cta();
  const int t = rt::tid();
  if (c.regs[t] < 0) {
    const int r0 = rt::kernel_num_regs();
    for (int& r : c.regs)
      if (r < 0) r = r0;
  }
  if (regs < 24 || regs > 256 || regs % 8)
    rt::report(rt::describe(site) + ": " + std::to_string(regs) +
               " registers (must be a multiple of 8 in 24 .. 256)");
  int& cur = c.regs[t];
  if (!inc) {
    if (regs > cur)
      rt::report(rt::describe(site) + ": " + std::to_string(regs) +
                 " registers is more than the thread holds (" + std::to_string(cur) + ")");
    c.reg_free += cur - regs;
    cur = regs;
    for (int w : c.reg_waiters) rt::wake(w);
    c.reg_waiters.clear();
    return;
  }
  if (regs < cur)
    rt::report(rt::describe(site) + ": " + std::to_string(regs) +
               " registers is fewer than the thread holds (" + std::to_string(cur) + ")");
  const int need = regs - cur;
  while (c.reg_free < need) {
    c.reg_waiters.push_back(t);
    rt::block("setmaxnreg.inc (waits for registers that setmaxnreg.dec returns to the CTA's pool)", site);
  }
  c.reg_free -= need;
  cur = regs;
}

// ---- named barriers -----------------------------------------------------------------------------------------------
void bar_sync(uint32_t id, uint32_t threads, bool wait) {
  const char* what = wait ? "bar.sync" : "bar.arrive";
  const uint64_t site = rt::site(what, EMU_PC);
  Cta& c = cta();
  if (id == 0 || id > 15)
    rt::report(rt::describe(site) + ": barrier " + std::to_string(id) +
               " (1 .. 15 are emulated; 0 is __syncthreads' barrier)");
  if (threads == 0 || threads % 32 || static_cast<int>(threads) > c.nthreads)
    rt::report(rt::describe(site) + ": thread count " + std::to_string(threads) +
               " (a multiple of 32, at most the block's " + std::to_string(c.nthreads) + ")");
  NamedBar& b = c.named[id];
  if (b.arrived == 0) {
    b.count = threads;
    b.site = site;
  } else if (b.count != threads) {
    rt::report(rt::describe(site) + " on barrier " + std::to_string(id) + " with " +
               std::to_string(threads) + " threads while " + std::to_string(b.arrived) + " threads arrived at " +
               rt::describe(b.site) + " expecting " + std::to_string(b.count));
  }
  release_into(b.rel);
  const uint64_t my_phase = b.phase;
  if (++b.arrived == b.count) {
    join(b.done, b.rel);
    std::fill(b.rel.begin(), b.rel.end(), 0u);
    b.arrived = 0;
    ++b.phase;
    for (int w : b.waiters) rt::wake(w);
    b.waiters.clear();
    if (wait) rt::acquire(b.done);
    return;
  }
  if (!wait) return;
  b.waiters.push_back(rt::tid());
  while (c.named[id].phase == my_phase) rt::block(what, site);
  rt::acquire(c.named[id].done);
}

}  // namespace emu::sm90
