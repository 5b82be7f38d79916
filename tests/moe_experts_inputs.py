"""Inputs and baselines of the moe_experts tests (decode and prefill regimes, quantized experts), shared with
test_emu_sm90.py and test_emu_traffic.py: weights, routings (through the reference moe_route: these tests exercise
the expert GEMMs, not the moe_route kernel) and the float32 / low-precision baselines of the 2x rule."""
import torch
import torch.nn.functional as F

from mixtral_ext import ops, reference


def route_args(route):
    """moe_experts' routing arguments (every Route field but expert_counts), in schema order."""
    return route.topk_weights, route.topk_ids, route.expert_offsets, route.sorted_tokens, route.token_rows


def make_weights(E, H, I, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    # Scaled so activations stay O(1): the error rule is relative to the output magnitude.
    w13 = (torch.randn(E, 2 * I, H, device=device, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device, generator=g) / I ** 0.5).to(dtype)
    return w13, w2


def ref_route(logits, k):
    """The reference route (on the GPU): these tests exercise moe_experts independently of the moe_route kernel."""
    return ops.Route(*reference.moe_route(logits, k))


def routed(T, E, k, skew, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, E, device=device, generator=g)
    if skew == "one_expert":  # every token on expert E-1 (and one other when k > 1)
        logits[:, E - 1] += 40
    elif skew == "all_on_two":  # every token on the same k experts: the longest row chunks
        logits[:, 1] += 40
        logits[:, 3] += 30
    elif skew == "empty_expert":
        logits[:, 0] -= 40
        logits[:, 2] -= 40
    return ref_route(logits, k)


def active_only_route(T, E, k, device):
    """(route, inactive experts): every token picks experts 2 and 5 (logits +40 / +30); the caller poisons the
    others' weights to show the kernels never read an expert nobody picked."""
    logits = torch.randn(T, E, device=device)
    logits[:, 2] += 40
    logits[:, 5] += 30
    return ref_route(logits, k), [e for e in range(E) if e not in (2, 5)]


def make_logits(T, E, kind, seed):
    """Router logits [T, E] float32 for a routing pattern:
    random; one (top-1 takes expert 5 for every token, top-2 expert 2 second); two_empty (experts 1 and 4 never
    chosen); single_row (expert 7 chosen by token 0 only, as its first choice)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if kind == "one":
        logits[:, 5] += 40.0
        logits[:, 2 % E] += 20.0
    elif kind == "two_empty":
        logits[:, [1, 4]] = -40.0
    elif kind == "single_row":
        logits[:, E - 1] = -40.0
        logits[0, E - 1] = 40.0
    return logits


def eager_low(x, route, w13, w2):
    """The same math as transformers' eager expert loop in the low dtype: every matmul, the activation and the
    weighted accumulation rounded to x's dtype (the baseline of the 2x rule)."""
    y = torch.zeros_like(x)
    offs = route.expert_offsets.tolist()
    for e in range(w13.shape[0]):
        a, b = offs[e], offs[e + 1]
        if a == b:
            continue
        rows = torch.arange(a, b, device=x.device)
        tok = route.sorted_tokens[a:b].long()
        h = x[tok] @ w13[e].t()
        act = F.silu(h[:, 0::2]) * h[:, 1::2]
        o = act @ w2[e].t()
        # slot of each row: token_rows[t, s] == row
        slot = (route.token_rows[tok].long() == rows[:, None]).int().argmax(dim=1)
        wt = route.topk_weights[tok, slot].to(x.dtype)
        y.index_add_(0, tok, o * wt[:, None])
    return y


def eager_low_rows(x, route, w13, w2):
    """eager_low with the weighted sum done slot by slot over the expert-sorted rows (the order the grouped GEMM
    tests compare against): every matmul output and the activation rounded to x's dtype."""
    T, H = x.shape
    offs = route.expert_offsets.tolist()
    rows = x[route.sorted_tokens.long()]
    out_rows = torch.zeros(rows.shape[0], H, dtype=x.dtype, device=x.device)
    for e in range(w13.shape[0]):
        a, b = offs[e], offs[e + 1]
        if a == b:
            continue
        h = rows[a:b] @ w13[e].t()
        out_rows[a:b] = (F.silu(h[:, 0::2]) * h[:, 1::2]) @ w2[e].t()
    y = torch.zeros(T, H, dtype=x.dtype, device=x.device)
    for s in range(route.topk_weights.shape[1]):
        y += route.topk_weights[:, s:s + 1].to(x.dtype) * out_rows[route.token_rows[:, s].long()]
    return y


def reference_fp32(x, route, w13, w2):
    return reference.moe_experts(x.float(), route.topk_weights, route.topk_ids, route.expert_offsets,
                                 route.sorted_tokens, route.token_rows, w13.float(), w2.float())
