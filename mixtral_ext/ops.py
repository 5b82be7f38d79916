"""The op surface: one schema list, the reference as the kernel for every device without a CUDA kernel, fake
kernels for tracing, and the CUDA kernels from `_C` (csrc/ops.cpp registers them with TORCH_LIBRARY_IMPL).

`torch.ops.mixtral_ext.<op>` exists with or without the build, works under torch.compile (fake kernels) and inside
CUDA graphs (no op synchronises with the host on the CUDA path). The Python functions at the bottom are the
friendly spelling the model uses; on tensors off the GPU they run the model's CPU path (cpu.py: transformers'
numerics at transformers' speed) rather than the reference, which stays the oracle and the registered CPU kernel.
"""
import glob
import operator
import os
import warnings
from typing import NamedTuple

import torch

from . import cpu, reference

# One line per op: (name, schema). Tensor(a!) marks an argument the op writes in place.
SCHEMAS = [
    # out = rmsnorm(x) * weight, or with residual: residual += x (in place), out = rmsnorm(residual) * weight.
    ("rms_norm", "rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!)? residual=None) -> Tensor"),
    # RoPE on q and k of the fused qkv projection, k and v written to the cache at (seq_ids[t], positions[t]).
    ("rope_kv_append", "rope_kv_append(Tensor qkv, Tensor positions, Tensor seq_ids, Tensor cos_sin, "
                       "Tensor(a!) k_cache, Tensor(b!) v_cache) -> Tensor"),
    # Causal GQA flash attention of a packed varlen batch of new tokens against the cache (prefix + themselves).
    ("attention_prefill", "attention_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q, "
                          "Tensor seq_lens_k, int max_seqlen_q, float scale, int window=0) -> Tensor"),
    # One query token per sequence against the cache, split-KV with a log-sum-exp combine.
    ("attention_decode", "attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, "
                         "float scale, int window=0) -> Tensor"),
    # Softmax, top-k, renormalise, per-expert counts/offsets and the expert-sorted permutation, fused.
    ("moe_route", "moe_route(Tensor router_logits, int top_k) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
    # Permuted expert GEMMs (gate/up with fused silu*mul, then down) and the weighted combine in token order.
    ("moe_experts", "moe_experts(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor expert_offsets, "
                    "Tensor sorted_tokens, Tensor token_rows, Tensor w13, Tensor w2) -> Tensor"),
    # moe_experts with weight-only quantized experts (bits 8: int8 per output row; bits 4: packed int4 per group of
    # 128 inputs; float32 scales; formats in mixtral_ext/quant.py), dequantized on the fly, float32 accumulation.
    ("moe_experts_quant", "moe_experts_quant(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor expert_offsets, "
                          "Tensor sorted_tokens, Tensor token_rows, Tensor w13, Tensor w13_scale, Tensor w2, "
                          "Tensor w2_scale, int bits) -> Tensor"),
]
OP_NAMES = [name for name, _ in SCHEMAS]
# Ops without a CUDA kernel in _C yet: on CUDA tensors they run the reference (whose host reads rule out CUDA graphs;
# generate.graphs_supported then decodes eagerly). tests/test_build.py checks this set against the build both ways.
REFERENCE_ONLY = set()

_lib = torch.library.Library("mixtral_ext", "DEF")
for _name, _schema in SCHEMAS:
    _lib.define(_schema)
    # CompositeExplicitAutograd: the reference serves every backend that has no kernel of its own (the CPU always,
    # CUDA when _C is absent). A CUDA kernel registered by _C takes precedence on CUDA tensors.
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


@torch.library.register_fake("mixtral_ext::rms_norm")
def _(x, weight, eps, residual=None):
    return torch.empty_like(x)


@torch.library.register_fake("mixtral_ext::rope_kv_append")
def _(qkv, positions, seq_ids, cos_sin, k_cache, v_cache):
    D, Hkv = k_cache.shape[3], k_cache.shape[2]
    return qkv.new_empty(qkv.shape[0], qkv.shape[1] // D - 2 * Hkv, D)


@torch.library.register_fake("mixtral_ext::attention_prefill")
def _(q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, max_seqlen_q, scale, window=0):
    return torch.empty_like(q)


@torch.library.register_fake("mixtral_ext::attention_decode")
def _(q, k_cache, v_cache, seq_lens, scale, window=0):
    return torch.empty_like(q)


@torch.library.register_fake("mixtral_ext::moe_route")
def _(router_logits, top_k):
    T, E = router_logits.shape
    i32 = dict(dtype=torch.int32, device=router_logits.device)
    return (router_logits.new_empty(T, top_k, dtype=torch.float32), router_logits.new_empty(T, top_k, **i32),
            router_logits.new_empty(E, **i32), router_logits.new_empty(E + 1, **i32),
            router_logits.new_empty(T * top_k, **i32), router_logits.new_empty(T, top_k, **i32))


@torch.library.register_fake("mixtral_ext::moe_experts")
def _(x, topk_weights, topk_ids, expert_offsets, sorted_tokens, token_rows, w13, w2):
    return torch.empty_like(x)


@torch.library.register_fake("mixtral_ext::moe_experts_quant")
def _(x, topk_weights, topk_ids, expert_offsets, sorted_tokens, token_rows, w13, w13_scale, w2, w2_scale, bits):
    return torch.empty_like(x)


def _load_extension():
    """Load mixtral_ext/_C*.so; return (loaded, reason). Never raises: the reference ops are the fallback."""
    if os.environ.get("MIXTRAL_EXT_CUDA", "").strip() == "0":
        return False, "disabled by MIXTRAL_EXT_CUDA=0"
    found = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_C*.so")))
    if not found:
        return False, "not built (no mixtral_ext/_C*.so: no CUDA toolkit or a CPU-only torch at install time)"
    try:
        torch.ops.load_library(found[0])
    except Exception as exc:  # a broken or mismatched build must not make the package unimportable
        return False, f"failed to load {os.path.basename(found[0])}: {exc}"
    return True, f"loaded {os.path.basename(found[0])}"


HAS_CUDA_KERNELS, EXTENSION_STATUS = _load_extension()
# Said once per process: always when a build exists but is broken, otherwise only where a GPU would have used it.
if not HAS_CUDA_KERNELS and (EXTENSION_STATUS.startswith("failed") or torch.cuda.is_available()):
    warnings.warn(f"mixtral_ext: CUDA extension {EXTENSION_STATUS}; every op runs through the PyTorch reference",
                  RuntimeWarning, stacklevel=2)


def has_cuda_kernel(name):
    """Whether _C registered a CUDA kernel for the op (not just the reference fallback)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mixtral_ext::{name}", "CUDA")


class Route(NamedTuple):
    """moe_route's outputs; see reference.moe_route for the contract."""
    topk_weights: torch.Tensor  # [T, k] float32
    topk_ids: torch.Tensor  # [T, k] int32
    expert_counts: torch.Tensor  # [E] int32
    expert_offsets: torch.Tensor  # [E + 1] int32
    sorted_tokens: torch.Tensor  # [T * k] int32
    token_rows: torch.Tensor  # [T, k] int32


# The CUDA kernels' own predicates: torch.ops.mixtral_ext.<op>_supported(<shape ints>, dtype) -> bool, registered by
# _C (csrc/op_impl.h define_supported_ops; the limits live in the kernels' headers, next to the code they describe).
# The emulation build registers the same predicates as torch.ops.mixtral_emu.*_supported (tests/test_supported.py).
_PREDICATES = torch.ops.mixtral_ext if HAS_CUDA_KERNELS else None

# Each op's arguments (as the functions below pass them to _dispatch) -> its predicate's arguments.
PREDICATE_ARGS = {
    "rms_norm": lambda x, *_: (x.dtype,),
    "rope_kv_append": lambda qkv, *_: (qkv.dtype,),
    # (head_dim, q_heads, kv_heads, dtype) from q [., Hq, D] and k_cache [B, S, Hkv, D]
    "attention_prefill": lambda q, k_cache, *_: (q.shape[-1], q.shape[1], k_cache.shape[2], q.dtype),
    "attention_decode": lambda q, k_cache, *_: (q.shape[-1], q.shape[1], k_cache.shape[2], q.dtype),
    # (experts, top_k, dtype) from router_logits [T, E]
    "moe_route": lambda logits, top_k: (logits.shape[-1], top_k, logits.dtype),
    # (experts, hidden, inter_size[, bits], dtype) from x [T, H], the five routing tensors and w13 [E, 2I, .]
    "moe_experts": lambda x, *rest: (rest[5].shape[0], x.shape[-1], rest[5].shape[1] // 2, x.dtype),
    "moe_experts_quant": lambda x, *rest: (rest[5].shape[0], x.shape[-1], rest[5].shape[1] // 2, rest[9], x.dtype),
}


@torch.compiler.assume_constant_result  # a host-side answer about static shapes: a constant in a compiled graph
def _ask(name, *args):
    return _PREDICATES is not None and bool(getattr(_PREDICATES, f"{name}_supported")(*args))


_ASKED = {}  # (name, *args) -> bool: one predicate call per shape (~5 us through the dispatcher), then a lookup


def kernel_supported(name, *args):
    """Whether _C's CUDA kernel of op `name` implements these shapes and dtype: args are the predicate's own, e.g.
    kernel_supported("attention_decode", head_dim, q_heads, kv_heads, torch.bfloat16). False without _C."""
    # operator.index: under torch.compile a symbolic size becomes its value (and a guard), so the answer is a constant.
    key = (name, *(a if isinstance(a, torch.dtype) else operator.index(a) for a in args))
    answer = _ASKED.get(key)
    if answer is None:
        answer = _ASKED[key] = _ask(*key)
    return answer


def _dispatch(name, key, *args):
    if not key.is_cuda:  # the model's CPU path (cpu.py), called directly: transformers' numerics, no dispatcher
        return getattr(cpu, name)(*args)
    try:
        shape = PREDICATE_ARGS[name](*args)
    except IndexError:  # tensors of the wrong rank: the kernel's checks name the problem
        return getattr(torch.ops.mixtral_ext, name)(*args)
    # A shape or dtype the kernel does not implement (e.g. a float32 model, a small test config on a GPU) runs the
    # reference, so every op works for every dtype on every device; so does every op when _C is not loaded.
    if not kernel_supported(name, *shape):
        return getattr(reference, name)(*args)
    return getattr(torch.ops.mixtral_ext, name)(*args)


def rms_norm(x, weight, eps, residual=None):
    """Returns (normed, new_residual). With residual given, it is updated in place to residual + x."""
    out = _dispatch("rms_norm", x, x, weight, float(eps), residual)
    return out, (x if residual is None else residual)


def rope_kv_append(qkv, positions, seq_ids, cos_sin, k_cache, v_cache):
    return _dispatch("rope_kv_append", qkv, qkv, positions, seq_ids, cos_sin, k_cache, v_cache)


def attention_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, max_seqlen_q, scale, window=0):
    return _dispatch("attention_prefill", q, q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, int(max_seqlen_q),
                     float(scale), int(window or 0))


def attention_decode(q, k_cache, v_cache, seq_lens, scale, window=0):
    return _dispatch("attention_decode", q, q, k_cache, v_cache, seq_lens, float(scale), int(window or 0))


def moe_route(router_logits, top_k=2):
    return Route(*_dispatch("moe_route", router_logits, router_logits, int(top_k)))


def moe_experts(x, route, w13, w2, w13_scale=None, w2_scale=None):
    """The experts of a routed batch. Float w13/w2 run moe_experts; quantized ones (int8, or uint8 = packed int4,
    with their float32 scales; see mixtral_ext/quant.py) run moe_experts_quant."""
    r = (route.topk_weights, route.topk_ids, route.expert_offsets, route.sorted_tokens, route.token_rows)
    if w13_scale is None and w2_scale is None:
        return _dispatch("moe_experts", x, x, *r, w13, w2)
    bits = {torch.int8: 8, torch.uint8: 4}.get(w13.dtype)
    if bits is None or w13_scale is None or w2_scale is None:
        raise ValueError(f"moe_experts: quantized experts need int8 or uint8 (packed int4) w13 and both scales; got "
                         f"w13 {w13.dtype}, w13_scale {'missing' if w13_scale is None else 'given'}, w2_scale "
                         f"{'missing' if w2_scale is None else 'given'}")
    return _dispatch("moe_experts_quant", x, x, *r, w13, w13_scale, w2, w2_scale, bits)
