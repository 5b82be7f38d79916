"""Pure-PyTorch reference of every op: the oracle for tests and benchmarks, and the CPU path of the model.

Each function has exactly the contract of the CUDA op of the same name (see ops.py for the schemas). They favour
clarity over speed, compute in float32 and round once to the output dtype.

Dimension legend: T tokens (packed over the batch), B sequences, S cache length, H hidden, I expert FFN width,
E experts, k experts per token, Hq / Hkv query / key-value heads, D head dim.
"""
import torch
import torch.nn.functional as F

from .quant import dequantize


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm of x (or of residual + x, in place into residual, when residual is given).

    x, residual: [T, H]; weight: [H]. Returns the normed output [T, H] in x's dtype. The sum is rounded to the
    residual dtype before the norm, as transformers does (h = x + attn_out in the model dtype). The normalised
    value is rounded to x's dtype before the weight multiply, again as transformers' MixtralRMSNorm does.
    """
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)


def rope_cos_sin(max_positions, head_dim, theta, device=None):
    """The rotary table [max_positions, D] in float32: cos(p * f_i) in the first D/2 columns, sin in the last D/2.

    f_i = theta^(-2i/D), computed exactly as transformers does so fp32 logits agree to the last bits.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)  # [P, D/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()


def apply_rope(x, cs):
    """Rotate-half RoPE in float32. x: [T, h, D]; cs: [T, D] rows of the rope_cos_sin table."""
    half = x.shape[-1] // 2
    cos = cs[:, None, :half].repeat(1, 1, 2)
    sin = cs[:, None, half:].repeat(1, 1, 2)
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return xf * cos + rotated * sin


def rope_kv_append(qkv, positions, seq_ids, cos_sin, k_cache, v_cache):
    """RoPE on q and k, k and v written into the cache; returns the rotated q.

    qkv: [T, (Hq + 2 Hkv) * D], the fused projection output (q heads, then k heads, then v heads).
    positions: [T] int32, each token's position in its sequence (its cache slot); seq_ids: [T] int32, its cache
    row. cos_sin: [P, D] float32 from rope_cos_sin. k_cache, v_cache: [B, S, Hkv, D], written in place.
    Returns q: [T, Hq, D] in qkv's dtype.
    """
    T = qkv.shape[0]
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    Hq = qkv.shape[1] // D - 2 * Hkv
    q, k, v = qkv.view(T, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=1)
    pos = positions.long()
    seq = seq_ids.long()
    cs = cos_sin[pos]  # [T, D]
    k_cache[seq, pos] = apply_rope(k, cs).to(k_cache.dtype)
    v_cache[seq, pos] = v.to(v_cache.dtype)
    return apply_rope(q, cs).to(qkv.dtype)


def _visible(q_pos, k_pos, window):
    """Causal (and sliding-window) visibility: key j is seen by the query at position p iff j <= p and, with a
    window W > 0, p - j < W (the query sees itself and the W - 1 keys before it, as transformers' Mistral)."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window > 0:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def check_gqa(op, q, k_cache):
    """Raise ValueError unless q's Hq heads (dim 1) group evenly over k_cache's Hkv KV heads (dim 2): the kernels'
    "multiple of the cache's KV heads" check, for the paths that run without them (CPU, shapes the kernels do not
    implement), where an uneven pairing would otherwise fail inside a view with a message naming neither."""
    Hq, Hkv = q.shape[1], k_cache.shape[2]
    if Hkv <= 0 or Hq <= 0 or Hq % Hkv:
        raise ValueError(f"{op}: q heads ({Hq}) must be a multiple of the cache's KV heads ({Hkv})")


def attention_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, max_seqlen_q, scale, window=0):
    """Causal GQA attention of a packed batch of new tokens against the cache (which already holds them).

    q: [T, Hq, D], sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (int32 [B+1]).
    k_cache, v_cache: [B, S, Hkv, D]; sequence b's keys are its first seq_lens_k[b] slots (int32 [B]): a cached
    prefix followed by the n_b new tokens, so query i of sequence b sits at position seq_lens_k[b] - n_b + i.
    max_seqlen_q bounds n_b (the kernel sizes its grid with it). Softmax in float32. Returns [T, Hq, D].
    """
    check_gqa("attention_prefill", q, k_cache)
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens_k.tolist()
    for b in range(len(lens)):
        n, L = cu[b + 1] - cu[b], lens[b]
        if n == 0:
            continue
        qb = q[cu[b]:cu[b + 1]].float()  # [n, Hq, D]
        kb = k_cache[b, :L].float().repeat_interleave(Hq // Hkv, dim=1)  # [L, Hq, D]
        vb = v_cache[b, :L].float().repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        mask = _visible(torch.arange(L - n, L, device=q.device), torch.arange(L, device=q.device), window)
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", p, vb).to(q.dtype)
    return out


def attention_decode(q, k_cache, v_cache, seq_lens, scale, window=0):
    """One query per sequence against its cache. q: [B, Hq, D]; caches [B, S, Hkv, D]; seq_lens: [B] int32, the
    number of valid slots including the new token (which sits at seq_lens[b] - 1); 0 gives a zero row.
    Returns [B, Hq, D].

    Written without host synchronisation so it can serve as the fallback inside a captured decode step.
    """
    check_gqa("attention_decode", q, k_cache)
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    qf = q.float().view(B, Hkv, G, D)
    s = torch.einsum("bhgd,bshd->bhgs", qf, k_cache.float()) * scale  # [B, Hkv, G, S]
    k_pos = torch.arange(S, device=q.device)
    q_pos = seq_lens.long()[:, None] - 1  # [B, 1]
    mask = k_pos[None, :] <= q_pos
    if window > 0:
        mask &= k_pos[None, :] > q_pos - window
    # A sequence with seq_lens[b] == 0 sees no key: its softmax row is all NaN, and its output is defined as zeros.
    p = torch.softmax(s.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhgs,bshd->bhgd", p, v_cache.float()).reshape(B, Hq, D).to(q.dtype)


def moe_route(router_logits, top_k):
    """Top-k expert choice per token and the expert-sorted permutation.

    router_logits: [T, E]. Returns
      topk_weights [T, k] float32: softmax over all E in float32, the k largest, renormalised to sum to 1;
      topk_ids     [T, k] int32:   the chosen experts, best first; ties break toward the lower expert index;
      expert_counts [E] int32, expert_offsets [E + 1] int32 (exclusive prefix sum of the counts);
      sorted_tokens [T * k] int32: the token of each expert-sorted row (grouped by expert, tokens ascending);
      token_rows   [T, k] int32:   the row of each (token, slot) in that order (inverse of sorted_tokens).
    """
    T, E = router_logits.shape
    logits = router_logits.float()
    probs = torch.softmax(logits, dim=-1)
    # A stable descending sort keeps the lower index first among equal logits: that is the tie rule.
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]  # [T, k]
    weights = probs.gather(1, ids)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    flat = ids.reshape(-1)  # [T*k], index t*k + s
    counts = torch.bincount(flat, minlength=E).to(torch.int32)
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=router_logits.device)
    offsets[1:] = torch.cumsum(counts, 0)
    order = torch.sort(flat, stable=True).indices  # stable: tokens stay ascending within an expert
    sorted_tokens = (order // top_k).to(torch.int32)
    token_rows = torch.empty_like(order)
    token_rows[order] = torch.arange(T * top_k, device=router_logits.device)
    return (weights, ids.to(torch.int32), counts, offsets, sorted_tokens,
            token_rows.view(T, top_k).to(torch.int32))


def moe_experts(x, topk_weights, topk_ids, expert_offsets, sorted_tokens, token_rows, w13, w2):
    """y[t] = sum_s topk_weights[t, s] * w2[e](silu(w1[e] x[t]) * w3[e] x[t]),  e = topk_ids[t, s].

    x: [T, H]; the routing tensors as returned by moe_route; w13: [E, 2I, H] with w1 and w3 interleaved by row
    (w13[e, 2i] = w1[e, i], w13[e, 2i + 1] = w3[e, i]) so one pass yields gate and up of the same unit;
    w2: [E, H, I]. Float32 throughout, the slots summed in slot order, rounded once to x's dtype. Returns [T, H].
    """
    return _experts(x, topk_weights, expert_offsets, sorted_tokens, token_rows, w13.shape[0],
                    lambda e: w13[e].float(), lambda e: w2[e].float())


def moe_experts_quant(x, topk_weights, topk_ids, expert_offsets, sorted_tokens, token_rows, w13, w13_scale, w2,
                      w2_scale, bits):
    """moe_experts with weight-only quantized experts: each active expert's weights are dequantized to float32
    (quant.dequantize: q * scale) and then multiplied exactly as moe_experts does. The formats (mixtral_ext/quant.py):
      bits 8: w13 int8 [E, 2I, H], w13_scale float32 [E, 2I]; w2 int8 [E, H, I], w2_scale float32 [E, H]
      bits 4: w13 uint8 [E, 2I, H/2] (two inputs a byte, input 2j in the low nibble of byte j), w13_scale float32
              [E, 2I, H/128]; w2 uint8 [E, H, I/2], w2_scale float32 [E, H, I/128]
    w13's rows interleave w1 and w3 as in moe_experts. Returns [T, H] in x's dtype. ValueError on a format
    mismatch (bits, dtypes, shapes), naming the tensor.
    """
    check_quantized_experts(x, w13, w13_scale, w2, w2_scale, bits)
    return _experts(x, topk_weights, expert_offsets, sorted_tokens, token_rows, w13.shape[0],
                    lambda e: dequantize(w13[e], w13_scale[e]), lambda e: dequantize(w2[e], w2_scale[e]))


def check_quantized_experts(x, w13, w13_scale, w2, w2_scale, bits):
    """The shape/dtype contract of moe_experts_quant (the CUDA binding's TORCH_CHECKs say the same)."""
    if bits not in (8, 4):
        raise ValueError(f"moe_experts_quant: bits must be 8 (int8) or 4 (packed int4), got {bits}")
    H = x.shape[-1]
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"moe_experts_quant: w13 and w2 must be [E, rows, packed inputs], got {tuple(w13.shape)} "
                         f"and {tuple(w2.shape)}")
    E, two_i = w13.shape[0], w13.shape[1]
    if two_i % 2:
        raise ValueError(f"moe_experts_quant: w13 has {two_i} rows, not 2 * I (w1 and w3 interleaved)")
    I = two_i // 2
    per_byte = 1 if bits == 8 else 2
    want = {"w13": (w13, torch.int8 if bits == 8 else torch.uint8, (E, 2 * I, H // per_byte)),
            "w2": (w2, torch.int8 if bits == 8 else torch.uint8, (E, H, I // per_byte))}
    if bits == 4:
        for what, width in (("hidden size H (w13's input width)", H), ("expert width I (w2's input width)", I)):
            if width % 128:
                raise ValueError(f"moe_experts_quant: int4 groups 128 inputs per scale, but the {what} is {width}")
        want["w13_scale"] = (w13_scale, torch.float32, (E, 2 * I, H // 128))
        want["w2_scale"] = (w2_scale, torch.float32, (E, H, I // 128))
    else:
        want["w13_scale"] = (w13_scale, torch.float32, (E, 2 * I))
        want["w2_scale"] = (w2_scale, torch.float32, (E, H))
    for name, (t, dtype, shape) in want.items():
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"moe_experts_quant (bits={bits}): {name} must be {dtype} {shape} for x of width {H} "
                             f"and {E} experts of width {I}; got {t.dtype} {tuple(t.shape)}")


def _experts(x, topk_weights, expert_offsets, sorted_tokens, token_rows, E, w13_of, w2_of):
    """moe_experts' arithmetic with the float32 weights of expert e given by w13_of(e) [2I, H] and w2_of(e) [H, I]
    (read only for the experts that have rows)."""
    T, H = x.shape
    rows = x[sorted_tokens.long()].float()  # [T*k, H] in expert order
    out_rows = torch.zeros(rows.shape[0], H, dtype=torch.float32, device=x.device)
    offs = expert_offsets.tolist()
    for e in range(E):
        a, b = offs[e], offs[e + 1]
        if a == b:
            continue
        h = rows[a:b] @ w13_of(e).t()  # [n, 2I]
        act = F.silu(h[:, 0::2]) * h[:, 1::2]  # [n, I]
        out_rows[a:b] = act @ w2_of(e).t()
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for s in range(topk_weights.shape[1]):
        y += topk_weights[:, s:s + 1].float() * out_rows[token_rows[:, s].long()]
    return y.to(x.dtype)
