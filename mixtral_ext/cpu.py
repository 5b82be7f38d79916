"""The model's CPU path: every op with the contract of reference.py, at the speed and memory of transformers.

Why a second implementation and not the reference: the reference is the oracle of the CUDA kernels (float32 math,
one rounding at the end), and it must stay that, while a bf16 model on the CPU should compute as transformers does,
which rounds in between. So this module follows transformers' MixtralForCausalLM dtype by dtype: matmuls in the
model dtype (the CPU's bf16 GEMMs accumulate in float32), RMSNorm and the router softmax in float32 with
transformers' roundings, attention through scaled_dot_product_attention (float32 softmax, memory linear in the
prompt, grouped-query heads without copies of K/V), the experts' routing weights applied in float32. In float32 it
is the reference's math up to summation order (the transformers parity tests hold it to 1e-4). RoPE stays in float32
(transformers rounds cos/sin to the model dtype first): cheaper than a round trip and never less accurate.

ops.py calls these directly for every tensor that is not on a GPU (no dispatcher in between: 5-16 us per call);
torch.ops.mixtral_ext.* on the CPU still runs the reference. Ops cost time per call here, so no cast that does
nothing is issued and each op is spelt with as few tensor ops as its contract allows.

Dimension legend as in reference.py: T tokens, B sequences, S cache length, H hidden, I expert FFN width, E experts,
k experts per token, Hq / Hkv query / key-value heads, G = Hq / Hkv, D head dim.
"""
import torch
import torch.nn.functional as F

from .reference import check_gqa

# Expert rows from which bf16/fp16 gate/up halves are de-interleaved into contiguous blocks before silu(gate) * up:
# on every-other-column views silu takes a scalar path, slower in 16-bit types than the copy plus the vector path
# (measured at 2k rows); in float32, and for the few rows of a decode step, the copy costs more than it saves.
DEINTERLEAVE_ROWS = 32
# Queries per block where attention needs an explicit mask (a cached prefix, a sliding window, ragged decode):
# the boolean and float masks are [block, keys], so memory stays linear in the prompt.
PREFILL_BLOCK = 512


def rms_norm(x, weight, eps, residual=None):
    """reference.rms_norm: residual += x in the model dtype, the norm in float32, rounded before the weight."""
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x if x.dtype == torch.float32 else x.float()
    inv = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # [T, 1]
    normed = xf * inv
    out = weight * (normed if x.dtype == torch.float32 else normed.to(x.dtype))
    return out if out.dtype == x.dtype else out.to(x.dtype)


def rope_kv_append(qkv, positions, seq_ids, cos_sin, k_cache, v_cache):
    """reference.rope_kv_append, rotating q and k together (one multiply-add over both) in float32."""
    T = qkv.shape[0]
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    Hq = qkv.shape[1] // D - 2 * Hkv
    half = D // 2
    qk, v = qkv.view(T, Hq + 2 * Hkv, 2, half).split([Hq + Hkv, Hkv], dim=1)  # each head as its two halves
    # int64 once: indexing converts int32 indices itself, on every use.
    seq_ids, positions = seq_ids.long(), positions.long()
    cos, sin = cos_sin.index_select(0, positions).view(T, 2, 1, 1, half).unbind(1)  # [T, 1, 1, D/2] float32 each
    # rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); flip swaps the halves, the sign goes on after.
    rot = qk.flip(2) * sin  # [T, Hq + Hkv, 2, D/2] float32: (x2 sin, x1 sin)
    rot[:, :, 0].neg_()
    q, k = torch.addcmul(rot, qk, cos).split([Hq, Hkv], dim=1)
    k_cache[seq_ids, positions] = k.reshape(T, Hkv, D) if k.dtype == k_cache.dtype else k.to(k_cache.dtype).view(
        T, Hkv, D)
    v_cache[seq_ids, positions] = v.reshape(T, Hkv, D)
    return q.reshape(T, Hq, D) if q.dtype == qkv.dtype else q.to(qkv.dtype).view(T, Hq, D)


def _visible(q_pos, k_pos, window):
    """[..., n, L] bool from q_pos [..., n, 1] and k_pos [L]: causal, and inside the window when window > 0."""
    mask = k_pos <= q_pos
    if window > 0:
        mask &= k_pos > q_pos - window
    return mask


def attention_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, max_seqlen_q, scale, window=0):
    """reference.attention_prefill through scaled_dot_product_attention, one sequence at a time.

    A prompt with no cached prefix and no window shorter than itself is one causal call; otherwise the queries go
    in blocks of PREFILL_BLOCK, each against the keys it may see, with an explicit mask. Either way nothing
    quadratic in the prompt is allocated and K/V are read in place from the cache (strided, not repeated per head).
    """
    check_gqa("attention_prefill", q, k_cache)
    cu = cu_seqlens_q.tolist()  # prefill only: the host needs the lengths to slice the batch
    lens = seq_lens_k.tolist()
    gqa = q.shape[1] != k_cache.shape[2]
    out = None if len(lens) == 1 and cu[1] - cu[0] == q.shape[0] else q.new_empty(q.shape)
    for b, L in enumerate(lens):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        qb = q[cu[b]:cu[b + 1]].transpose(0, 1)[None]  # [1, Hq, n, D]
        kb = k_cache[b, :L].transpose(0, 1)[None]  # [1, Hkv, L, D]
        vb = v_cache[b, :L].transpose(0, 1)[None]
        if L == n and (window <= 0 or window >= n):
            ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            ob = qb.new_empty(qb.shape)
            for i in range(0, n, PREFILL_BLOCK):
                j = min(n, i + PREFILL_BLOCK)
                last = L - n + j - 1  # the last query's position; the first one's is L - n + i
                lo = max(0, L - n + i - window + 1) if window > 0 else 0
                q_pos = torch.arange(L - n + i, last + 1, device=q.device)[:, None]
                mask = _visible(q_pos, torch.arange(lo, last + 1, device=q.device), window)  # [j - i, keys]
                ob[:, :, i:j] = F.scaled_dot_product_attention(qb[:, :, i:j], kb[:, :, lo:last + 1],
                                                               vb[:, :, lo:last + 1], attn_mask=mask, scale=scale,
                                                               enable_gqa=gqa)
        ob = ob[0].transpose(0, 1)  # [n, Hq, D]
        if out is None:
            return ob if ob.is_contiguous() else ob.contiguous()
        out[cu[b]:cu[b + 1]] = ob
    return q.new_zeros(q.shape) if out is None else out


def attention_decode(q, k_cache, v_cache, seq_lens, scale, window=0):
    """reference.attention_decode over the valid slots only: the cache is cut at the longest sequence, and each
    KV head's G query heads go through one scaled_dot_product_attention call as G queries (no causal mask needed:
    the new token is the last valid slot). A mask is built only for ragged batches and sliding windows, which is
    why the slots of a shorter sequence up to the longest one must be finite, as for the reference (KVCache zeroes
    them)."""
    check_gqa("attention_decode", q, k_cache)
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    L = int(seq_lens.max()) if B > 1 else int(seq_lens)  # one scalar read of the (CPU) tensor; sizes the cut below
    L = min(L, S)  # the views below must stay inside this layer's cache
    if L == 0:
        return q.new_zeros(q.shape)
    # [B, Hkv, L, D] views of the caches' first L slots, heads before slots, in one op each (this runs per layer
    # and step, where every op costs microseconds).
    kb, vb = (c.as_strided((B, Hkv, L, D), (c.stride(0), c.stride(2), c.stride(1), c.stride(3)), c.storage_offset())
              for c in (k_cache, v_cache))
    qb = q.reshape(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]
    if B == 1 and window <= 0:
        return F.scaled_dot_product_attention(qb, kb, vb, scale=scale).reshape(B, Hq, D)
    q_pos = (seq_lens - 1).view(B, 1, 1, 1)
    mask = _visible(q_pos, torch.arange(L, device=q.device), window)  # [B, 1, 1, L]
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
    # A sequence with seq_lens[b] == 0 sees no key: SDPA leaves NaN there, and the contract says zeros.
    return o.reshape(B, Hq, D).nan_to_num_(0.0)


def moe_route(router_logits, top_k):
    """reference.moe_route (the same stable sort of the logits, so the same ids and tie rule), in fewer ops."""
    T, E = router_logits.shape
    i32 = dict(dtype=torch.int32, device=router_logits.device)
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    ids = torch.sort(router_logits, dim=-1, descending=True, stable=True).indices[:, :top_k]  # [T, k] int64
    weights = probs.gather(1, ids)
    weights /= weights.sum(dim=-1, keepdim=True)
    flat = ids.reshape(-1)  # [T*k], index t*k + s
    counts = torch.bincount(flat, minlength=E)
    offsets = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))  # [E + 1], exclusive prefix sum
    order = torch.sort(flat, stable=True).indices  # stable: tokens stay ascending within an expert
    token_rows = torch.empty(T * top_k, **i32)
    token_rows[order] = torch.arange(T * top_k, **i32)
    sorted_tokens = order if top_k == 1 else order.div_(top_k, rounding_mode="floor")
    return (weights, ids.to(torch.int32), counts.to(torch.int32), offsets, sorted_tokens.to(torch.int32),
            token_rows.view(T, top_k))


def _has_grouped_mm():
    """Whether torch._grouped_mm runs on the CPU here (torch >= 2.9; older versions lack the op or its CPU kernel)."""
    try:
        x = torch.ones(2, 16)
        return bool(torch._grouped_mm(x, torch.ones(2, 16, 16), offs=torch.tensor([1, 2], dtype=torch.int32))
                    .eq(16).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_GROUPED_MM = _has_grouped_mm()


def _grouped_mm_takes(w13, w2):
    """torch._grouped_mm wants 16-byte aligned operands and strides. The expert weights' strides are multiples of H
    and I (and of 2I, I*H, ...), which also give every activation's row stride; a width that is not (a tensor-parallel
    shard, a tiny test config) takes the loop."""
    return (_GROUPED_MM and w13.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and all(w.data_ptr() % 16 == 0 and all(st * w.element_size() % 16 == 0 for st in w.stride() if st != 1)
                    for w in (w13, w2)))


def _silu_mul(h):
    """silu(gate) * up from h [n, 2I] with gate and up interleaved by column (w13's row order). Returns [n, I]."""
    if h.shape[0] < DEINTERLEAVE_ROWS or h.element_size() > 2:
        return F.silu(h[:, 0::2]) * h[:, 1::2]
    gate, up = h.view(h.shape[0], -1, 2).permute(2, 0, 1).contiguous()  # [2, n, I]
    return F.silu(gate, inplace=True).mul_(up)  # in the copy we own: no new [n, I] buffers to fault in


def moe_experts(x, topk_weights, topk_ids, expert_offsets, sorted_tokens, token_rows, w13, w2):
    """reference.moe_experts with the GEMMs in the model dtype, as transformers: gate/up and down rounded to it,
    silu(gate) * up in it; each slot's output times its float32 weight, the slots summed in float32, rounded once.

    torch._grouped_mm runs every expert's rows in one call, from the offsets as they are (no host read); where it
    is missing or does not take the shapes, a loop over the experts that have rows.
    """
    T, H = x.shape
    k = token_rows.shape[1]
    rows = x.index_select(0, sorted_tokens)  # [T*k, H] in expert order
    if _grouped_mm_takes(w13, w2) and x.dtype == w13.dtype:
        ends = expert_offsets[1:]
        h = torch._grouped_mm(rows, w13.transpose(1, 2), offs=ends)  # [T*k, 2I]: gate, up interleaved by unit
        out_rows = torch._grouped_mm(_silu_mul(h), w2.transpose(1, 2), offs=ends)  # [T*k, H]
    else:
        out_rows = x.new_empty(rows.shape[0], H)
        offs = expert_offsets.tolist()
        for e in range(w13.shape[0]):
            a, b = offs[e], offs[e + 1]
            if a < b:
                torch.mm(_silu_mul(F.linear(rows[a:b], w13[e])), w2[e].t(), out=out_rows[a:b])
    y = (out_rows.index_select(0, token_rows.view(-1)).view(T, k, H) * topk_weights[:, :, None]).sum(1)  # float32
    return y if y.dtype == x.dtype else y.to(x.dtype)


def moe_experts_quant(x, topk_weights, topk_ids, expert_offsets, sorted_tokens, token_rows, w13, w13_scale, w2,
                      w2_scale, bits):
    """Weight-only int8 / int4 experts (quant.py formats): the reference's arithmetic, which dequantizes each active
    expert to float32 as it is used (never a dequantized copy of every expert). Not yet transformers' bf16 roundings:
    transformers has no such format to match, and the quantized CPU model is tested against its dequantized twin."""
    from . import reference

    return reference.moe_experts_quant(x, topk_weights, topk_ids, expert_offsets, sorted_tokens, token_rows, w13,
                                       w13_scale, w2, w2_scale, bits)
