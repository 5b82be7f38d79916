"""moe_experts in the decode regime, Mixtral shapes (H 4096, I 14336, 8 experts, top-2, bf16): µs and achieved GB/s
(weight bytes of the ACTIVE experts / time) against the measured copy bandwidth, the PyTorch eager per-expert loop
(transformers' MixtralExperts when importable, else the same loop written here) and torch._grouped_mm where the
installed torch has it. Target: >= 85% of copy bandwidth at T = 1 and T = 8.

Each call reads its experts' 3 x H x I weights once (704 MB at T = 1), far more than L2, so no argument rotation
is needed for the weights; routes and inputs rotate over a few sets. Routing comes from random router logits, so
the number of active experts per T is what Mixtral would see with a uniform router (2 at T = 1, ~7 at T = 8)."""
import torch
import torch.nn.functional as F

import common
from mixtral_ext import ops

H, I, E, K = 4096, 14336, 8, 2


def _eager_loop_own(x, route, gate_up, down):
    """transformers' eager expert loop (gate_up stored gate rows then up rows), written out."""
    y = torch.zeros_like(x)
    ids = route.topk_ids.long()
    for e in range(E):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        o = F.linear(F.silu(gate) * up, down[e]) * route.topk_weights[tok, slot, None].to(x.dtype)
        y.index_add_(0, tok, o)
    return y


def _transformers_experts(gate_up, down):
    """transformers' MixtralExperts holding our weights (no copy), or None where the API differs."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
        with torch.device("meta"):
            mod = MixtralExperts(cfg)
        mod.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        mod.down_proj = torch.nn.Parameter(down, requires_grad=False)
        return lambda x, route: mod(x, route.topk_ids.long(), route.topk_weights.to(x.dtype))
    except Exception:
        return None


def _grouped_mm_fn(w13, w2):
    """The same op through torch._grouped_mm (gather, grouped GEMM, silu*mul, grouped GEMM, weighted combine)."""
    if not hasattr(torch, "_grouped_mm"):
        return None
    w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, H, 2I], [E, I, H]: column-major views

    def fn(x, route):
        offs = route.expert_offsets[1:]
        h = torch._grouped_mm(x[route.sorted_tokens.long()], w13_t, offs=offs)
        o = torch._grouped_mm(F.silu(h[:, 0::2]) * h[:, 1::2], w2_t, offs=offs)
        rows = o[route.token_rows.long()].float()  # [T, k, H]
        return (rows * route.topk_weights[..., None]).sum(1).to(x.dtype)

    return fn


def _time_or_none(fn, sets):
    if fn is None:
        return None
    try:
        return common.time_fn(fn, sets, warmup=2, iters=10)
    except Exception as exc:  # a baseline the installed versions cannot run is reported as missing
        print(f"moe_experts_decode: baseline failed: {type(exc).__name__}: {exc}")
        return None


def run(device, quick):
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5).bfloat16()
    # transformers' layout (gate rows then up rows) for the eager baseline; our w13 interleaves them.
    gate_up = torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1)
    hf = _transformers_experts(gate_up, w2)
    if hf is not None:  # the installed transformers may construct it but call it differently: try it once
        try:
            hf(torch.randn(1, H, device="cuda").bfloat16(), ops.moe_route(torch.randn(1, E, device="cuda"), K))
        except Exception as exc:
            print(f"moe_experts_decode: transformers MixtralExperts unusable ({type(exc).__name__}: {exc}); "
                  "own eager loop")
            hf = None
    eager_name = "transformers MixtralExperts" if hf is not None else "eager loop"
    eager_fn = hf or (lambda x, route: _eager_loop_own(x, route, gate_up, w2))
    gmm = _grouped_mm_fn(w13, w2)
    per_expert = 3 * H * I * 2
    rows = []
    for T in ([1, 8, 64] if quick else [1, 2, 4, 8, 16, 32, 64]):
        sets, active = common.routed_inputs(T, H, E, K, g)
        nbytes = active * per_expert
        ours = common.time_fn(lambda x, route: ops.moe_experts(x, route, w13, w2), sets)
        eager = _time_or_none(eager_fn, sets)
        grouped = _time_or_none(gmm, sets)
        gbs = nbytes / (ours * 1e-3) / 1e9
        rows.append({"T": T, "active_experts": active, "MB": nbytes / 1e6, "us": ours * 1e3, "GB/s": gbs,
                     "pct_copy": 100 * gbs / device["copy_gbs"],
                     "eager_us": None if eager is None else eager * 1e3,
                     "speedup_vs_eager": None if eager is None else eager / ours,
                     "grouped_mm_us": None if grouped is None else grouped * 1e3,
                     "speedup_vs_grouped_mm": None if grouped is None else grouped / ours})
    cols = [("T", "T", None), ("active_experts", "active experts", "{:.2f}"), ("MB", "weight MB", "{:.0f}"),
            ("us", "µs", "{:.0f}"), ("GB/s", "GB/s", "{:.0f}"), ("pct_copy", "% copy BW", "{:.0f}"),
            ("eager_us", f"{eager_name} µs", "{:.0f}"), ("speedup_vs_eager", "× eager", "{:.1f}"),
            ("grouped_mm_us", "torch._grouped_mm µs", "{:.0f}"), ("speedup_vs_grouped_mm", "× grouped_mm", "{:.1f}")]
    return (f"moe_experts decode, Mixtral shapes bf16 (GB/s = active experts' weight bytes / time; copy "
            f"{device['copy_gbs']} GB/s)", rows, cols)
