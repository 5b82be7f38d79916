"""Inputs and comparison points of the attention_prefill tests, shared with test_emu_sm90.py (the sm_90a path
emulated): random q and caches with stale slots, the mask spelled independently, the float32 reference and the
eager low-precision math of the 2x rule, evaluated in chunks of queries."""
import torch

from mixtral_ext import reference

D = 128


def visible(q_pos, k_pos, window):
    """Independent spelling of the mask: [n, L] bool."""
    diff = q_pos[:, None] - k_pos[None, :]
    ok = diff >= 0
    return ok & (diff < window) if window > 0 else ok


def make_inputs(new_lens, prefix_lens, Hq=4, Hkv=2, dtype=torch.float32, device="cpu", slack=0, seed=0,
                q_scale=1.0, stale=0.0):
    """Random q [T, Hq, D] and caches [B, S, Hkv, D] with S = max(prefix + new) + slack. Cache slots past each
    sequence's length hold `stale` (NaN in the GPU tests: the kernel must never let them reach the output)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = len(new_lens)
    lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    S = max(lens) + slack
    cu = [0]
    for n in new_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], Hq, D, generator=g) * q_scale
    k = torch.randn(B, S, Hkv, D, generator=g)
    v = torch.randn(B, S, Hkv, D, generator=g)
    for b, L in enumerate(lens):
        k[b, L:] = stale
        v[b, L:] = stale
    args = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    return (*args, torch.tensor(cu, dtype=torch.int32, device=device),
            torch.tensor(lens, dtype=torch.int32, device=device), max(new_lens), cu, lens)


# Oracles for long sequences are computed in query chunks: the chunk [a, a + c) of a sequence with n new tokens and
# L keys is itself a valid call with n' = c and L' = L - n + a + c (same positions, same keys), which bounds the
# reference's [Hq, n, L] score tensor.
CHUNK = 1024


def chunked(fn, q, k, v, cu, lens, scale, window):
    out = torch.empty_like(q) if q.dtype != torch.float32 else torch.empty(q.shape, device=q.device)
    for b in range(len(lens)):
        n, L = cu[b + 1] - cu[b], lens[b]
        for a in range(0, n, CHUNK):
            c = min(CHUNK, n - a)
            rows = slice(cu[b] + a, cu[b] + a + c)
            out[rows] = fn(q[rows], k[b:b + 1], v[b:b + 1], [0, c], [L - n + a + c], scale, window)
    return out


def ref_fp32(q, k, v, cu, lens, scale, window):
    dev = q.device
    return reference.attention_prefill(q.float(), k.float(), v.float(), torch.tensor(cu, dtype=torch.int32,
                                       device=dev), torch.tensor(lens, dtype=torch.int32, device=dev),
                                       max(cu[1] - cu[0], 1), scale, window)


def eager_low(q, k, v, cu, lens, scale, window):
    """The same attention math with low-precision tensors, as eager PyTorch would do it (one sequence)."""
    n, L = cu[1], lens[0]
    Hq, Hkv = q.shape[1], k.shape[2]
    kb = k[0, :L].repeat_interleave(Hq // Hkv, dim=1)  # [L, Hq, D] in the low dtype
    vb = v[0, :L].repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kb) * scale
    mask = visible(torch.arange(L - n, L, device=q.device), torch.arange(L, device=q.device), window)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", p, vb)
