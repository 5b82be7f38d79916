// The emulated Hopper (sm_90a) instructions that csrc/kernels/arch/sm90.cuh's MIXTRAL_EMU bodies call, and the
// emulated driver encoder of TMA tensor maps. Semantics from the PTX ISA (mbarrier, cp.async.bulk.tensor,
// wgmma.mma_async and its descriptors, setmaxnreg, bar.sync / bar.arrive, fence.proxy.async) and the CUDA driver API
// (cuTensorMapEncodeTiled); csrc/emu/sm90.cpp says what is modelled and how bugs are reported.
#pragma once
#include <cstdint>

#include "cuda_emu.h"

namespace emu::sm90 {

// mbarrier.* on the 8-byte barrier object at shared offset `bar`.
void mbar_init(uint32_t bar, uint32_t count);
void mbar_arrive(uint32_t bar, uint32_t expect_tx_bytes);  // arrive (.expect_tx when bytes > 0)
bool mbar_try_wait_parity(uint32_t bar, uint32_t parity);
void fence_mbarrier_init();
void fence_proxy_async();

// cp.async.bulk.tensor.{1..5}d.shared::cluster.global.mbarrier::complete_tx::bytes, tile mode.
void tma_load(uint32_t dst, const CUtensorMap* map, const int* coords, int rank, uint32_t bar);

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}: operand A from shared memory (desc_a) or registers (a: the
// thread's 4 .b32), B from shared memory (desc_b); trans_a / trans_b: 1 = MN-major (the instruction's imm-trans).
enum class WgmmaType : int { kBF16, kF16 };
void wgmma_issue(float* d, int n, WgmmaType type, uint64_t desc_a, const uint32_t* a, uint64_t desc_b, bool scale_d,
                 int scale_a, int scale_b, int trans_a, int trans_b);
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int pending);

void setmaxnreg(bool inc, int regs);
void bar_sync(uint32_t id, uint32_t threads, bool wait);  // bar.sync (wait) or bar.arrive

// cuTensorMapEncodeTiled (cuda.h's signature); the entry point cudaGetDriverEntryPoint returns in emulation.
CUresult tensor_map_encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* global_address,
                                 const cuuint64_t* global_dim, const cuuint64_t* global_strides,
                                 const cuuint32_t* box_dim, const cuuint32_t* element_strides,
                                 CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                 CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill oob_fill);

}  // namespace emu::sm90
