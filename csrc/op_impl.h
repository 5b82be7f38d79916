// The ops' tensor -> params logic, shared by the two torch bindings: csrc/ops.cpp (CUDA tensors, the real kernels)
// and csrc/emu/emu_ops.cpp (CPU tensors, the same kernels run by the emulation runtime). Torch-only: includes ATen
// and the kernels' torch-free headers, nothing of CUDA's (the emulation build sees its cuda_emu.h stand-ins).
//
// Every entry point: named shape / dtype / device / contiguity checks (TORCH_CHECK: the caller's error) -> device
// guard -> stream -> launch through a torch-free launcher in csrc/kernels -> launch-error check. Dimension legend as
// in reference.py (T tokens, B sequences, S cache slots, H hidden, I ffn, E experts, k slots, Hq/Hkv heads, D dim).
//
// What differs between the bindings is a backend object `b` with:
//   kDeviceWord                     "CUDA" / "CPU": the device tensors must be on (b.on_device(t))
//   b.empty(sizes, options, name)   output and workspace allocation (the emulator names buffers for its reports)
//   b.guard(t), b.stream()          device guard and stream
//   b.device_attrs(t)               the attributes of t's device (DeviceAttrs; the CUDA backend caches them)
//   b.check_launch(op, err)         launch-error check (the emulator raises its report first)
//   b.attn_prefill_path(q)          which attention_prefill kernel
//   b.decode_splits(n)              attention_decode's split count (n: the launcher's choice)
//   b.moe_experts_path()            moe_experts: the code path asked for (kAuto: the launcher's choice)
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_decode.h"
#include "attention_prefill.h"
#include "moe_experts.h"
#include "moe_route.h"
#include "rms_norm.h"
#include "rope_kv_append.h"

namespace mixtral::binding {

using mixtral::DType;

// The kernels' tag of a torch dtype; nullopt for the dtypes no kernel takes (float64, integers, ...).
inline std::optional<DType> dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: return std::nullopt;
  }
}

inline DType dtype_tag(const at::Tensor& t, const char* op, const char* name) {
  const std::optional<DType> dt = dtype_of(t.scalar_type());
  TORCH_CHECK(dt.has_value(), op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  return *dt;
}

#define CHECK_DEVICE_TENSOR(b, op, t) \
  TORCH_CHECK((b).on_device(t), op, ": " #t " must be a ", (b).kDeviceWord, " tensor, got device ", (t).device())
#define CHECK_SAME_DEVICE(op, a, b) \
  TORCH_CHECK((a).device() == (b).device(), op, ": " #a " and " #b " are on different devices (", \
              (a).device(), " vs ", (b).device(), ")")
#define CHECK_CONTIGUOUS(op, t) TORCH_CHECK((t).is_contiguous(), op, ": " #t " must be contiguous")
#define CHECK_DTYPE(op, t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), op, ": " #t " must be ", dt, ", got ", (t).scalar_type())
#define CHECK_DIM(op, t, n) TORCH_CHECK((t).dim() == (n), op, ": " #t " must be ", n, "-D, got shape ", (t).sizes())

// The device attributes the launchers need (host-side queries, no sync), read by read_device_attrs: the one place
// the bindings call cudaDeviceGetAttribute.
struct DeviceAttrs {
  int sm_count = 0;
  int max_smem_optin = 0;
  int sm_major = 0;
};

inline DeviceAttrs read_device_attrs(int device) {
  DeviceAttrs a;
  TORCH_CHECK(cudaDeviceGetAttribute(&a.sm_count, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&a.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) ==
                      cudaSuccess &&
                  cudaDeviceGetAttribute(&a.sm_major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess,
              "mixtral_ext: cannot read the attributes of CUDA device ", device);
  return a;
}

// attention_prefill / attention_decode: q [., Hq, D] and k_cache / v_cache [B, S, Hkv, D] of one shape, on b's
// device, in q's dtype. Which dtypes and shapes the kernels take is each op's *_supported predicate.
template <class Backend>
void check_q_and_caches(Backend& b, const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                        const at::Tensor& v_cache) {
  CHECK_DEVICE_TENSOR(b, op, q);
  CHECK_DIM(op, q, 3);
  CHECK_SAME_DEVICE(op, q, k_cache);
  CHECK_DIM(op, k_cache, 4);
  CHECK_DTYPE(op, k_cache, q.scalar_type());
  TORCH_CHECK(k_cache.size(3) == q.size(2), op, ": k_cache head_dim ", k_cache.size(3), " differs from q's ",
              q.size(2));
  CHECK_SAME_DEVICE(op, q, v_cache);
  CHECK_DTYPE(op, v_cache, q.scalar_type());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, ": k_cache shape ", k_cache.sizes(), " differs from v_cache ",
              v_cache.sizes());
}

// ---- rms_norm ---------------------------------------------------------------------------------------------------
// x: [T, H] (rows may be strided, H contiguous), weight: [H], residual: [T, H] or None (updated in place).
template <class Backend>
at::Tensor rms_norm_impl(Backend& b, const at::Tensor& x, const at::Tensor& weight, double eps,
                         const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "mixtral_ext::rms_norm";
  CHECK_DEVICE_TENSOR(b, op, x);
  CHECK_SAME_DEVICE(op, x, weight);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got ", x.sizes());
  TORCH_CHECK(x.stride(-1) == 1, op, ": x's last dimension must be contiguous");
  CHECK_DIM(op, weight, 1);
  TORCH_CHECK(weight.size(0) == x.size(-1), op, ": weight has ", weight.size(0), " elements, x's rows have ",
              x.size(-1));
  CHECK_CONTIGUOUS(op, weight);
  CHECK_DTYPE(op, weight, x.scalar_type());
  const int64_t H = x.size(-1);
  // Leading dims are flattened into rows; a 2-D strided view keeps its row stride, anything else must be dense.
  at::Tensor x2 = x.dim() == 2 ? x : x.contiguous().view({-1, H});
  mixtral::RmsNormParams p{};
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    CHECK_SAME_DEVICE(op, x, r);
    CHECK_DTYPE(op, r, x.scalar_type());
    TORCH_CHECK(r.sizes() == x.sizes(), op, ": residual shape ", r.sizes(), " differs from x shape ", x.sizes());
    TORCH_CHECK(r.stride(-1) == 1 && (r.dim() == 2 || r.is_contiguous()), op,
                ": residual must be contiguous (or a 2-D view with contiguous rows)");
    p.residual = r.data_ptr();
    p.residual_stride = r.dim() == 2 ? r.stride(0) : H;
  }
  at::Tensor out = b.empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous), "out");
  p.x = x2.data_ptr();
  p.w = weight.data_ptr();
  p.out = out.data_ptr();
  p.tokens = x2.size(0);
  p.hidden = H;
  p.x_stride = x2.stride(0);
  p.eps = static_cast<float>(eps);
  p.dtype = dtype_tag(x, op, "x");
  const auto guard = b.guard(x);
  b.check_launch(op, mixtral::rms_norm_launch(p, b.stream()));
  return out;
}

// ---- attention_prefill ------------------------------------------------------------------------------------------
// q: [T, Hq, D] (D contiguous), k_cache / v_cache: [B, S, Hkv, D] (D contiguous), cu_seqlens_q: [B + 1] int32,
// seq_lens_k: [B] int32. Values inside cu_seqlens_q / seq_lens_k are the caller's contract (0 = cu[0] <= ... <=
// cu[B] = T, n_b <= max_seqlen_q, n_b <= seq_lens_k[b] <= S): checking them would need a host sync.
template <class Backend>
at::Tensor attention_prefill_impl(Backend& b, const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k, int64_t max_seqlen_q,
                                  double scale, int64_t window) {
  constexpr const char* op = "mixtral_ext::attention_prefill";
  check_q_and_caches(b, op, q, k_cache, v_cache);
  CHECK_SAME_DEVICE(op, q, cu_seqlens_q);
  CHECK_SAME_DEVICE(op, q, seq_lens_k);
  CHECK_DIM(op, cu_seqlens_q, 1);
  CHECK_DIM(op, seq_lens_k, 1);
  CHECK_DTYPE(op, cu_seqlens_q, at::kInt);
  CHECK_DTYPE(op, seq_lens_k, at::kInt);
  CHECK_CONTIGUOUS(op, cu_seqlens_q);
  CHECK_CONTIGUOUS(op, seq_lens_k);
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t B = k_cache.size(0), S = k_cache.size(1), Hkv = k_cache.size(2);
  // Hq > 0 as well: Hq = 0 would pass the modulo and then divide by G = 0 below.
  TORCH_CHECK(Hkv > 0 && Hq > 0 && Hq % Hkv == 0, op, ": q heads (", Hq, ") must be a multiple of the cache's KV "
              "heads (", Hkv, ")");
  const std::optional<DType> dtype = dtype_of(q.scalar_type());
  TORCH_CHECK(dtype && mixtral::attention_prefill_supported(D, Hq, Hkv, *dtype), op, ": unsupported: only head_dim ",
              mixtral::kAttnPrefillHeadDim, ", GQA group sizes Hq / Hkv that divide ", mixtral::kAttnPrefillRowsPerBlock,
              " and bfloat16 / float16 are implemented; got head_dim ", D, ", Hq / Hkv = ", Hq, " / ", Hkv, " = ",
              Hq / Hkv, ", q ", q.scalar_type());
  TORCH_CHECK(cu_seqlens_q.size(0) == B + 1, op, ": cu_seqlens_q must have B + 1 = ", B + 1, " entries, got ",
              cu_seqlens_q.size(0));
  TORCH_CHECK(seq_lens_k.size(0) == B, op, ": seq_lens_k must have B = ", B, " entries, got ", seq_lens_k.size(0));
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q < (int64_t{1} << 31), op, ": max_seqlen_q must be in [0, 2^31), got ",
              max_seqlen_q);
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0 = no window), got ", window);
  TORCH_CHECK(S < (int64_t{1} << 31) && T < (int64_t{1} << 31) && B < 65536 && Hkv < 65536, op,
              ": sizes out of range (T, S < 2^31, B, Hkv < 65536)");
  // The kernels copy 16-byte rows of D elements: unit inner stride, every other stride and the base 16-byte aligned.
  auto check_rows = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.stride(-1) == 1, op, ": ", name, "'s last dimension must be contiguous");
    for (int d = 0; d + 1 < t.dim(); ++d)
      TORCH_CHECK(t.stride(d) % 8 == 0, op, ": ", name, "'s strides must be multiples of 8 elements, got ",
                  t.strides());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name, " must be 16-byte aligned");
  };
  check_rows(q, "q");
  check_rows(k_cache, "k_cache");
  check_rows(v_cache, "v_cache");

  at::Tensor out = b.empty({T, Hq, D}, q.options().memory_format(at::MemoryFormat::Contiguous), "out");
  if (T == 0 || B == 0 || max_seqlen_q == 0) return out;
  mixtral::AttentionPrefillParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  p.seq_lens_k = seq_lens_k.data_ptr<int>();
  p.out = out.data_ptr();
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_stride_b = k_cache.stride(0);
  p.k_stride_s = k_cache.stride(1);
  p.k_stride_h = k_cache.stride(2);
  p.v_stride_b = v_cache.stride(0);
  p.v_stride_s = v_cache.stride(1);
  p.v_stride_h = v_cache.stride(2);
  p.batch = static_cast<int>(B);
  p.cache_len = static_cast<int>(S);
  p.q_heads = static_cast<int>(Hq);
  p.kv_heads = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.scale = static_cast<float>(scale);
  p.window = static_cast<int>(std::min<int64_t>(window, int64_t{1} << 30));
  p.dtype = *dtype;
  const auto guard = b.guard(q);
  const mixtral::AttnPath path = b.attn_prefill_path(q);
  b.check_launch(op, mixtral::attention_prefill_launch(p, path, b.stream()));
  return out;
}

// ---- rope_kv_append ---------------------------------------------------------------------------------------------
// qkv: [T, (Hq + 2 Hkv) * D], positions / seq_ids: [T] int32, cos_sin: [P, D] float32 (cos | sin halves),
// k_cache / v_cache: [B, S, Hkv, D] (written in place), all contiguous. Returns q: [T, Hq, D]. Index ranges
// (0 <= positions[t] < min(P, S), 0 <= seq_ids[t] < B) are the caller's contract: checking them would need a host
// sync; the kernel skips a violating token (no cache write, zero q row) instead of writing out of bounds.
template <class Backend>
at::Tensor rope_kv_append_impl(Backend& b, const at::Tensor& qkv, const at::Tensor& positions,
                               const at::Tensor& seq_ids,
                               const at::Tensor& cos_sin, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  constexpr const char* op = "mixtral_ext::rope_kv_append";
  CHECK_DEVICE_TENSOR(b, op, qkv);
  CHECK_SAME_DEVICE(op, qkv, positions);
  CHECK_SAME_DEVICE(op, qkv, seq_ids);
  CHECK_SAME_DEVICE(op, qkv, cos_sin);
  CHECK_SAME_DEVICE(op, qkv, k_cache);
  CHECK_SAME_DEVICE(op, qkv, v_cache);
  CHECK_DIM(op, qkv, 2);
  CHECK_DIM(op, positions, 1);
  CHECK_DIM(op, seq_ids, 1);
  CHECK_DIM(op, cos_sin, 2);
  CHECK_DIM(op, k_cache, 4);
  CHECK_DIM(op, v_cache, 4);
  const DType dtype = dtype_tag(qkv, op, "qkv");
  CHECK_DTYPE(op, k_cache, qkv.scalar_type());
  CHECK_DTYPE(op, v_cache, qkv.scalar_type());
  CHECK_DTYPE(op, positions, at::kInt);
  CHECK_DTYPE(op, seq_ids, at::kInt);
  CHECK_DTYPE(op, cos_sin, at::kFloat);
  CHECK_CONTIGUOUS(op, qkv);
  CHECK_CONTIGUOUS(op, positions);
  CHECK_CONTIGUOUS(op, seq_ids);
  CHECK_CONTIGUOUS(op, cos_sin);
  CHECK_CONTIGUOUS(op, k_cache);
  CHECK_CONTIGUOUS(op, v_cache);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, ": k_cache shape ", k_cache.sizes(), " differs from v_cache ",
              v_cache.sizes());
  const int64_t T = qkv.size(0), W = qkv.size(1);
  const int64_t B = k_cache.size(0), S = k_cache.size(1), Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(D > 0 && D % 2 == 0, op, ": head_dim (k_cache.size(3)) must be even and positive, got ", D);
  TORCH_CHECK(Hkv > 0, op, ": k_cache must have at least one KV head");
  TORCH_CHECK(W % D == 0 && W / D > 2 * Hkv, op, ": qkv width ", W, " must be (Hq + 2 * Hkv) * D with Hq >= 1, Hkv = ",
              Hkv, ", D = ", D);
  const int64_t Hq = W / D - 2 * Hkv;
  TORCH_CHECK(positions.size(0) == T, op, ": positions has ", positions.size(0), " entries, qkv has ", T, " tokens");
  TORCH_CHECK(seq_ids.size(0) == T, op, ": seq_ids has ", seq_ids.size(0), " entries, qkv has ", T, " tokens");
  TORCH_CHECK(cos_sin.size(1) == D, op, ": cos_sin must be [P, D = ", D, "], got ", cos_sin.sizes());
  TORCH_CHECK(Hq + 2 * Hkv < (int64_t{1} << 31), op, ": too many heads");

  at::Tensor q = b.empty({T, Hq, D}, qkv.options().memory_format(at::MemoryFormat::Contiguous), "q");
  if (T == 0) return q;
  mixtral::RopeKvAppendParams p{};
  p.qkv = qkv.data_ptr();
  p.positions = positions.data_ptr<int32_t>();
  p.seq_ids = seq_ids.data_ptr<int32_t>();
  p.cos_sin = cos_sin.data_ptr<float>();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.q_out = q.data_ptr();
  p.tokens = T;
  p.q_heads = static_cast<int>(Hq);
  p.kv_heads = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.table_len = cos_sin.size(0);
  p.batch = B;
  p.cache_len = S;
  p.dtype = dtype;
  const auto guard = b.guard(qkv);
  b.check_launch(op, mixtral::rope_kv_append_launch(p, b.stream()));
  return q;
}

// ---- attention_decode -------------------------------------------------------------------------------------------
// q: [B, Hq, D], k_cache / v_cache: [B, S, Hkv, D], seq_lens: [B] int32 (valid slots incl. the new token), all
// contiguous. Returns [B, Hq, D]. seq_lens values are the caller's contract (0 <= seq_lens[b] <= S; 0 gives a zero
// row); the split count depends only on the shapes, so a captured graph replays correctly with new lengths.
// The backend may force the split count (b.decode_splits), for tests of the split/combine path.
template <class Backend>
at::Tensor attention_decode_impl(Backend& b, const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache,
                                 const at::Tensor& seq_lens, double scale, int64_t window) {
  constexpr const char* op = "mixtral_ext::attention_decode";
  check_q_and_caches(b, op, q, k_cache, v_cache);
  CHECK_SAME_DEVICE(op, q, seq_lens);
  CHECK_DIM(op, seq_lens, 1);
  CHECK_DTYPE(op, seq_lens, at::kInt);
  CHECK_CONTIGUOUS(op, q);
  CHECK_CONTIGUOUS(op, k_cache);
  CHECK_CONTIGUOUS(op, v_cache);
  CHECK_CONTIGUOUS(op, seq_lens);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t S = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B, op, ": k_cache has ", k_cache.size(0), " sequences, q has ", B);
  TORCH_CHECK(seq_lens.size(0) == B, op, ": seq_lens must have B = ", B, " entries, got ", seq_lens.size(0));
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": q heads (", Hq, ") must be a multiple of the cache's KV heads (", Hkv,
              ")");
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0 = no window), got ", window);
  TORCH_CHECK(B < 65536 && Hkv < 65536 && S > 0 && S * Hkv * D < (int64_t{1} << 31), op,
              ": sizes out of range (B, Hkv < 65536, 0 < S, S * Hkv * D < 2^31), got B = ", B, ", Hkv = ", Hkv,
              ", S = ", S);
  const std::optional<DType> dtype_or = dtype_of(q.scalar_type());
  TORCH_CHECK(dtype_or && mixtral::attention_decode_supported(static_cast<int>(D), static_cast<int>(Hq),
                                                              static_cast<int>(Hkv), *dtype_or),
              op, ": unsupported shape or dtype: head_dim must be 16, 32, 64 or 128, Hq / Hkv 1, 2, 4 or 8 and q "
              "bfloat16 or float16; got head_dim ", D, ", Hq ", Hq, ", Hkv ", Hkv, ", q ", q.scalar_type());
  const DType dtype = *dtype_or;
  for (const at::Tensor* t : {&q, &k_cache, &v_cache})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, op, ": q, k_cache and v_cache must be 16-byte "
                "aligned");

  at::Tensor out = b.empty({B, Hq, D}, q.options().memory_format(at::MemoryFormat::Contiguous), "out");
  if (B == 0) return out;
  const auto guard = b.guard(q);
  const int sm_count = b.device_attrs(q).sm_count;
  const int64_t span = window > 0 ? std::min<int64_t>(S, window) : S;  // most slots one query can see
  int splits = mixtral::attention_decode_num_splits(static_cast<int>(B), static_cast<int>(Hq), static_cast<int>(Hkv),
                                                    static_cast<int>(D), span, dtype, sm_count);
  splits = b.decode_splits(splits);
  at::Tensor ws_out, ws_lse;
  mixtral::AttentionDecodeParams p{};
  if (splits > 1) {
    ws_out = b.empty({splits, B, Hq, D}, q.options().dtype(at::kFloat), "ws_out");  // [splits, B, Hq, D]
    ws_lse = b.empty({splits, B, Hq}, q.options().dtype(at::kFloat), "ws_lse");     // [splits, B, Hq]
    p.ws_out = ws_out.data_ptr<float>();
    p.ws_lse = ws_lse.data_ptr<float>();
  }
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.batch = static_cast<int>(B);
  p.q_heads = static_cast<int>(Hq);
  p.kv_heads = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.cache_len = S;
  p.window = static_cast<int>(std::min<int64_t>(window, int64_t{1} << 30));
  p.scale = static_cast<float>(scale);
  p.num_splits = splits;
  p.dtype = dtype;
  b.check_launch(op, mixtral::attention_decode_launch(p, b.stream()));
  return out;
}

// ---- moe_route --------------------------------------------------------------------------------------------------
// router_logits: [T, E] (E contiguous, rows may be strided). Returns (topk_weights [T, k] f32, topk_ids [T, k] i32,
// expert_counts [E] i32, expert_offsets [E + 1] i32, sorted_tokens [T * k] i32, token_rows [T, k] i32).
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_impl(
    Backend& b, const at::Tensor& router_logits, int64_t top_k) {
  constexpr const char* op = "mixtral_ext::moe_route";
  CHECK_DEVICE_TENSOR(b, op, router_logits);
  CHECK_DIM(op, router_logits, 2);
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  const DType dt = dtype_tag(router_logits, op, "router_logits");
  TORCH_CHECK(mixtral::moe_route_supported(E, top_k, dt), op, ": unsupported: router_logits has ", E,
              " experts (columns) and top_k = ", top_k, "; supported: 1 to ", mixtral::kMoeRouteMaxExperts,
              " experts, top_k in 1..min(E, ", mixtral::kMoeRouteMaxTopK, ")");
  TORCH_CHECK(router_logits.stride(1) == 1 || E == 1, op, ": router_logits' expert dimension must be contiguous");
  TORCH_CHECK(T * top_k < (int64_t{1} << 31), op, ": T * top_k = ", T * top_k, " rows exceed the int32 indices");
  const auto guard = b.guard(router_logits);
  const auto i32 = router_logits.options().dtype(at::kInt);
  at::Tensor weights = b.empty({T, top_k}, router_logits.options().dtype(at::kFloat), "weights");
  at::Tensor ids = b.empty({T, top_k}, i32, "ids");
  at::Tensor counts = b.empty({E}, i32, "counts");
  at::Tensor offsets = b.empty({E + 1}, i32, "offsets");
  at::Tensor sorted_tokens = b.empty({T * top_k}, i32, "sorted_tokens");
  at::Tensor token_rows = b.empty({T, top_k}, i32, "token_rows");
  const int64_t ws_ints = mixtral::moe_route_workspace_ints(T, static_cast<int>(E));
  at::Tensor workspace = ws_ints > 0 ? b.empty({ws_ints}, i32, "workspace") : at::Tensor();
  mixtral::MoeRouteParams p{};
  p.logits = router_logits.data_ptr();
  p.topk_weights = weights.data_ptr<float>();
  p.topk_ids = ids.data_ptr<int>();
  p.expert_counts = counts.data_ptr<int>();
  p.expert_offsets = offsets.data_ptr<int>();
  p.sorted_tokens = sorted_tokens.data_ptr<int>();
  p.token_rows = token_rows.data_ptr<int>();
  p.workspace = ws_ints > 0 ? workspace.data_ptr<int>() : nullptr;
  p.tokens = T;
  p.logits_stride = router_logits.stride(0);
  p.experts = static_cast<int>(E);
  p.top_k = static_cast<int>(top_k);
  p.dtype = dt;
  b.check_launch(op, mixtral::moe_route_launch(p, b.stream()));
  return {weights, ids, counts, offsets, sorted_tokens, token_rows};
}

// ---- moe_experts ------------------------------------------------------------------------------------------------
// The kernels' limits on E, H and I for the weight format (moe_experts_supported), x's dtype checked before.
inline void check_moe_experts_supported(const char* op, int64_t E, int64_t H, int64_t I, mixtral::WeightFormat wformat,
                                        const at::Tensor& x) {
  const int64_t multiple = mixtral::moe_experts_width_multiple(wformat);
  TORCH_CHECK(mixtral::moe_experts_supported(E, H, I, wformat, dtype_tag(x, op, "x")), op, ": unsupported: ", E,
              " experts, H = ", H, ", I = ", I, "; supported: 1 to ", mixtral::kMoeMaxExperts, " experts, H and I "
              "positive multiples of ", multiple, wformat == mixtral::WeightFormat::kDense ? " (16-byte vectors)"
              : wformat == mixtral::WeightFormat::kInt8 ? " for 8-bit weights (16-byte vectors)"
              : " for 4-bit weights (whole 128-input scale groups)");
}

// The checks and the launch moe_experts and moe_experts_quant share, after each has checked its weights: x [T, H]
// bf16/fp16; the routing tensors as moe_route returns them (topk_weights [T, k] f32, topk_ids and token_rows [T, k]
// i32, expert_offsets [E + 1] i32, sorted_tokens [T * k] i32); w13 / w2 in `wformat` (dense, or quantized with
// w13_scale / w2_scale). The values of the routing tensors are the caller's contract (moe_route's output): checking
// them would need a host sync. Returns y [T, H] in x's dtype.
template <class Backend>
at::Tensor moe_experts_run(Backend& b, const char* op, const at::Tensor& x, const at::Tensor& topk_weights,
                           const at::Tensor& topk_ids, const at::Tensor& expert_offsets,
                           const at::Tensor& sorted_tokens, const at::Tensor& token_rows, const at::Tensor& w13,
                           const at::Tensor& w2, int64_t E, int64_t I, mixtral::WeightFormat wformat,
                           const float* w13_scale, const float* w2_scale) {
  for (const at::Tensor* t : {&topk_weights, &topk_ids, &expert_offsets, &sorted_tokens, &token_rows})
    TORCH_CHECK(t->device() == x.device(), op, ": every argument must be on x's device ", x.device(), ", got ",
                t->device());
  const int64_t T = x.size(0), H = x.size(1);
  CHECK_DIM(op, topk_weights, 2);
  const int64_t k = topk_weights.size(1);
  TORCH_CHECK(topk_weights.size(0) == T && k >= 1, op, ": topk_weights must be [T, k] = [", T, ", k >= 1], got ",
              topk_weights.sizes());
  CHECK_DTYPE(op, topk_weights, at::kFloat);
  CHECK_DTYPE(op, topk_ids, at::kInt);
  CHECK_DTYPE(op, expert_offsets, at::kInt);
  CHECK_DTYPE(op, sorted_tokens, at::kInt);
  CHECK_DTYPE(op, token_rows, at::kInt);
  TORCH_CHECK(topk_ids.sizes() == topk_weights.sizes(), op, ": topk_ids must be [T, k] like topk_weights, got ",
              topk_ids.sizes());
  TORCH_CHECK(token_rows.sizes() == topk_weights.sizes(), op, ": token_rows must be [T, k] like topk_weights, got ",
              token_rows.sizes());
  TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) == E + 1, op, ": expert_offsets must be [E + 1] = [",
              E + 1, "], got ", expert_offsets.sizes());
  TORCH_CHECK(sorted_tokens.dim() == 1 && sorted_tokens.size(0) == T * k, op, ": sorted_tokens must be [T * k] = [",
              T * k, "], got ", sorted_tokens.sizes());
  CHECK_CONTIGUOUS(op, topk_weights);
  CHECK_CONTIGUOUS(op, token_rows);
  CHECK_CONTIGUOUS(op, expert_offsets);
  CHECK_CONTIGUOUS(op, sorted_tokens);
  const int64_t R = T * k;
  // The GEMVs address activation rows with 32-bit vector offsets.
  TORCH_CHECK(R * std::max(H, I) / 8 < (int64_t{1} << 32) && R < (int64_t{1} << 31), op, ": T * k = ", R,
              " rows of ", std::max(H, I), " elements exceed the 32-bit row offsets");
  TORCH_CHECK((reinterpret_cast<uintptr_t>(x.data_ptr()) | reinterpret_cast<uintptr_t>(w13.data_ptr()) |
               reinterpret_cast<uintptr_t>(w2.data_ptr())) % 16 == 0,
              op, ": x, w13 and w2 must be 16-byte aligned");
  const DType dt = dtype_tag(x, op, "x");
  const auto guard = b.guard(x);
  at::Tensor y = b.empty({T, H}, x.options(), "y");
  if (T == 0) return y;
  at::Tensor inter = b.empty({R, I}, x.options(), "inter");  // [R, I] silu(gate) * up
  // [R, H] unweighted expert outputs
  at::Tensor out_rows = b.empty({R, H}, x.options().dtype(at::kFloat), "out_rows");
  const DeviceAttrs attrs = b.device_attrs(x);
  mixtral::MoeExpertsParams p{};
  p.x = x.data_ptr();
  p.topk_weights = topk_weights.data_ptr<float>();
  p.sorted_tokens = sorted_tokens.data_ptr<int>();
  p.expert_offsets = expert_offsets.data_ptr<int>();
  p.token_rows = token_rows.data_ptr<int>();
  p.w13 = w13.data_ptr();
  p.w2 = w2.data_ptr();
  p.wformat = wformat;
  p.w13_scale = w13_scale;
  p.w2_scale = w2_scale;
  p.inter = inter.data_ptr();
  p.out_rows = out_rows.data_ptr<float>();
  p.y = y.data_ptr();
  p.tokens = T;
  p.hidden = H;
  p.inter_size = I;
  p.experts = static_cast<int>(E);
  p.top_k = static_cast<int>(k);
  p.sm_count = attrs.sm_count;
  p.max_smem_optin = attrs.max_smem_optin;
  p.sm_major = attrs.sm_major;
  p.dtype = dt;
  p.path = b.moe_experts_path();
  const mixtral::MoeExpertsPath path = mixtral::moe_experts_select_path(p);
  TORCH_CHECK(path != mixtral::MoeExpertsPath::kUnavailable, op, ": the ", mixtral::moe_experts_path_name(p.path),
              " path cannot run T = ", T, ", H = ", H, ", I = ", I, ", E = ", E, ", k = ", k, " on this device (",
              "compute capability ", attrs.sm_major, ".x) with this build");
  // The grouped GEMMs read dense tiles: quantized experts are expanded to x's dtype first (a temporary of the dense
  // experts' size: 2.8 GB for a Mixtral layer in bf16).
  at::Tensor w13_dequant, w2_dequant;
  if (mixtral::moe_experts_needs_dequant(p, path)) {
    w13_dequant = b.empty({E, 2 * I, H}, x.options(), "w13_dequant");
    w2_dequant = b.empty({E, H, I}, x.options(), "w2_dequant");
    p.w13_dequant = w13_dequant.data_ptr();
    p.w2_dequant = w2_dequant.data_ptr();
  }
  b.check_launch(op, mixtral::moe_experts_launch(p, b.stream()));
  return y;
}

// x: [T, H] bf16/fp16; routing tensors as moe_route returns them (see moe_experts_run); w13: [E, 2I, H] (rows 2i /
// 2i+1 = gate / up of unit i); w2: [E, H, I], both in x's dtype. Returns y [T, H] in x's dtype.
template <class Backend>
at::Tensor moe_experts_impl(Backend& b, const at::Tensor& x, const at::Tensor& topk_weights,
                            const at::Tensor& topk_ids, const at::Tensor& expert_offsets,
                            const at::Tensor& sorted_tokens, const at::Tensor& token_rows, const at::Tensor& w13,
                            const at::Tensor& w2) {
  constexpr const char* op = "mixtral_ext::moe_experts";
  CHECK_DEVICE_TENSOR(b, op, x);
  for (const at::Tensor* t : {&w13, &w2})
    TORCH_CHECK(t->device() == x.device(), op, ": every argument must be on x's device ", x.device(), ", got ",
                t->device());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be bfloat16 or float16 (float32 runs the reference through ops.py), got ", x.scalar_type());
  CHECK_DIM(op, x, 2);
  CHECK_CONTIGUOUS(op, x);
  CHECK_DIM(op, w13, 3);
  CHECK_DIM(op, w2, 3);
  CHECK_DTYPE(op, w13, x.scalar_type());
  CHECK_DTYPE(op, w2, x.scalar_type());
  CHECK_CONTIGUOUS(op, w13);
  CHECK_CONTIGUOUS(op, w2);
  const int64_t H = x.size(1), E = w13.size(0), I = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) % 2 == 0 && w13.size(2) == H, op, ": w13 must be [E, 2I, H] with H = ", H, ", got ",
              w13.sizes());
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == H && w2.size(2) == I, op, ": w2 must be [E, H, I] = [", E, ", ", H,
              ", ", I, "], got ", w2.sizes());
  check_moe_experts_supported(op, E, H, I, mixtral::WeightFormat::kDense, x);
  return moe_experts_run(b, op, x, topk_weights, topk_ids, expert_offsets, sorted_tokens, token_rows, w13, w2, E, I,
                         mixtral::WeightFormat::kDense, nullptr, nullptr);
}

// ---- moe_experts_quant ------------------------------------------------------------------------------------------
// moe_experts with weight-only quantized experts (formats: mixtral_ext/quant.py; bits 8 or 4). x: [T, H] bf16/fp16;
// routing tensors as in moe_experts; bits 8: w13 int8 [E, 2I, H], w13_scale f32 [E, 2I], w2 int8 [E, H, I],
// w2_scale f32 [E, H]; bits 4: w13 uint8 [E, 2I, H/2], w13_scale f32 [E, 2I, H/128], w2 uint8 [E, H, I/2], w2_scale
// f32 [E, H, I/128]. The decode path runs the GEMVs on the quantized bytes, dequantizing in registers; the grouped
// GEMMs run on copies expanded to x's dtype (moe_experts.cu).
template <class Backend>
at::Tensor moe_experts_quant_impl(Backend& b, const at::Tensor& x, const at::Tensor& topk_weights,
                                  const at::Tensor& topk_ids, const at::Tensor& expert_offsets,
                                  const at::Tensor& sorted_tokens, const at::Tensor& token_rows,
                                  const at::Tensor& w13, const at::Tensor& w13_scale, const at::Tensor& w2,
                                  const at::Tensor& w2_scale, int64_t bits) {
  constexpr const char* op = "mixtral_ext::moe_experts_quant";
  CHECK_DEVICE_TENSOR(b, op, x);
  for (const at::Tensor* t : {&w13, &w13_scale, &w2, &w2_scale})
    TORCH_CHECK(t->device() == x.device(), op, ": every argument must be on x's device ", x.device(), ", got ",
                t->device());
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 (int8) or 4 (packed int4), got ", bits);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be bfloat16 or float16 (float32 runs the reference through ops.py), got ", x.scalar_type());
  CHECK_DIM(op, x, 2);
  CHECK_DIM(op, w13, 3);
  CHECK_DIM(op, w2, 3);
  const at::ScalarType qtype = bits == 8 ? at::kChar : at::kByte;
  CHECK_DTYPE(op, w13, qtype);
  CHECK_DTYPE(op, w2, qtype);
  CHECK_DTYPE(op, w13_scale, at::kFloat);
  CHECK_DTYPE(op, w2_scale, at::kFloat);
  for (const at::Tensor* t : {&x, &w13, &w13_scale, &w2, &w2_scale})
    TORCH_CHECK(t->is_contiguous(), op, ": x, w13, w13_scale, w2 and w2_scale must be contiguous");
  const int64_t H = x.size(1), E = w13.size(0), I = w13.size(1) / 2;
  const int64_t per_byte = bits == 8 ? 1 : 2;
  check_moe_experts_supported(op, E, H, I, bits == 8 ? mixtral::WeightFormat::kInt8 : mixtral::WeightFormat::kInt4, x);
  TORCH_CHECK(w13.size(1) % 2 == 0 && w13.size(2) * per_byte == H, op, ": w13 must be [E, 2I, ", H / per_byte,
              "] for H = ", H, ", got ", w13.sizes());
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == H && w2.size(2) * per_byte == I, op, ": w2 must be [", E, ", ", H,
              ", ", I / per_byte, "], got ", w2.sizes());
  const std::vector<int64_t> s13 = bits == 8 ? std::vector<int64_t>{E, 2 * I}
                                             : std::vector<int64_t>{E, 2 * I, H / mixtral::kInt4Group};
  const std::vector<int64_t> s2 = bits == 8 ? std::vector<int64_t>{E, H}
                                            : std::vector<int64_t>{E, H, I / mixtral::kInt4Group};
  TORCH_CHECK(w13_scale.sizes() == at::IntArrayRef(s13), op, ": w13_scale must be ", at::IntArrayRef(s13), ", got ",
              w13_scale.sizes());
  TORCH_CHECK(w2_scale.sizes() == at::IntArrayRef(s2), op, ": w2_scale must be ", at::IntArrayRef(s2), ", got ",
              w2_scale.sizes());
  return moe_experts_run(b, op, x, topk_weights, topk_ids, expert_offsets, sorted_tokens, token_rows, w13, w2, E, I,
                         bits == 8 ? mixtral::WeightFormat::kInt8 : mixtral::WeightFormat::kInt4,
                         w13_scale.data_ptr<float>(), w2_scale.data_ptr<float>());
}

// ---- what each kernel supports ----------------------------------------------------------------------------------
// torch.ops.<namespace>.<op>_supported(<shape ints>, dtype) -> bool for every op: the kernels' own predicates (in
// their headers), asked by mixtral_ext/ops.py (CUDA tensors of an unsupported shape or dtype run the reference) and
// by generate.graphs_supported. Both bindings register them (ops.cpp in mixtral_ext, emu_ops.cpp in mixtral_emu), so
// the emulation build tests the very predicates the CUDA build carries. No tensors: one kernel for every backend.
inline bool int_range(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

inline bool rms_norm_supported_op(at::ScalarType dtype) { return dtype_of(dtype).has_value(); }  // every DType

inline bool rope_kv_append_supported_op(at::ScalarType dtype) { return dtype_of(dtype).has_value(); }  // every DType

inline bool attention_prefill_supported_op(int64_t head_dim, int64_t q_heads, int64_t kv_heads, at::ScalarType dtype) {
  const std::optional<DType> dt = dtype_of(dtype);
  return dt && mixtral::attention_prefill_supported(head_dim, q_heads, kv_heads, *dt);
}

inline bool attention_decode_supported_op(int64_t head_dim, int64_t q_heads, int64_t kv_heads, at::ScalarType dtype) {
  const std::optional<DType> dt = dtype_of(dtype);
  return dt && int_range(head_dim) && int_range(q_heads) && int_range(kv_heads) &&
         mixtral::attention_decode_supported(static_cast<int>(head_dim), static_cast<int>(q_heads),
                                             static_cast<int>(kv_heads), *dt);
}

inline bool moe_route_supported_op(int64_t experts, int64_t top_k, at::ScalarType dtype) {
  const std::optional<DType> dt = dtype_of(dtype);
  return dt && mixtral::moe_route_supported(experts, top_k, *dt);
}

inline bool moe_experts_supported_op(int64_t experts, int64_t hidden, int64_t inter_size, at::ScalarType dtype) {
  const std::optional<DType> dt = dtype_of(dtype);
  return dt && mixtral::moe_experts_supported(experts, hidden, inter_size, mixtral::WeightFormat::kDense, *dt);
}

// bits: 8 (int8) or 4 (packed int4); any other value is not supported.
inline bool moe_experts_quant_supported_op(int64_t experts, int64_t hidden, int64_t inter_size, int64_t bits,
                                           at::ScalarType dtype) {
  const std::optional<DType> dt = dtype_of(dtype);
  return dt && (bits == 8 || bits == 4) &&
         mixtral::moe_experts_supported(experts, hidden, inter_size,
                                        bits == 8 ? mixtral::WeightFormat::kInt8 : mixtral::WeightFormat::kInt4, *dt);
}

inline void define_supported_ops(torch::Library& m) {
  m.def("rms_norm_supported(ScalarType dtype) -> bool", &rms_norm_supported_op);
  m.def("rope_kv_append_supported(ScalarType dtype) -> bool", &rope_kv_append_supported_op);
  m.def("attention_prefill_supported(int head_dim, int q_heads, int kv_heads, ScalarType dtype) -> bool",
        &attention_prefill_supported_op);
  m.def("attention_decode_supported(int head_dim, int q_heads, int kv_heads, ScalarType dtype) -> bool",
        &attention_decode_supported_op);
  m.def("moe_route_supported(int experts, int top_k, ScalarType dtype) -> bool", &moe_route_supported_op);
  m.def("moe_experts_supported(int experts, int hidden, int inter_size, ScalarType dtype) -> bool",
        &moe_experts_supported_op);
  m.def("moe_experts_quant_supported(int experts, int hidden, int inter_size, int bits, ScalarType dtype) -> bool",
        &moe_experts_quant_supported_op);
}

}  // namespace mixtral::binding
