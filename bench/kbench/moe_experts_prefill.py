"""moe_experts, prefill regime (Mixtral shapes: E=8, top-2, H=4096, I=14336): TFLOP/s of the whole op (gather,
both grouped GEMMs, combine) against the measured bf16 matmul rate, per code path (auto and, on Hopper, the sm80
path forced through MIXTRAL_EXT_MOE_PATH), and the baselines on the same GPU and routing:
  grouped_mm  torch._grouped_mm (CUTLASS) for the two GEMMs alone, where the installed torch has it (it is given
              the rows already permuted, and its silu*mul runs as a separate eager op: a GEMM-only lower bound);
  dense       torch.matmul of the same FLOPs ([R, H] x [H, 2I], then [R, I] x [I, H], one weight for all rows);
  hf_loop     transformers' MixtralSparseMoeBlock (router + per-expert loop), when transformers imports.
FLOPs per call: 2 R H 2I + 2 R I H = 6 R H I with R = 2T (router and combine not counted).
For T up to 512 the row also times moe_experts with MIXTRAL_EXT_MOE_PATH=decode (the decode GEMV kernels at any T):
where that column beats "ours", the decode threshold (kMoeExpertsDecodeMaxTokens, moe_experts.h) should move up.
"""
import os

import torch
import torch.nn.functional as F

import common
from mixtral_ext import ops, reference

E, TOP_K, H, I = 8, 2, 4096, 14336


def _with_path(path, fn):
    def run(*args):
        old = os.environ.get("MIXTRAL_EXT_MOE_PATH")
        os.environ["MIXTRAL_EXT_MOE_PATH"] = path
        try:
            return fn(*args)
        finally:
            if old is None:
                os.environ.pop("MIXTRAL_EXT_MOE_PATH", None)
            else:
                os.environ["MIXTRAL_EXT_MOE_PATH"] = old
    return run


def _grouped_mm_fn():
    gm = getattr(torch, "_grouped_mm", None)
    if gm is None:
        return None

    def run(x_perm, offs, w13t, w2t):
        h = gm(x_perm, w13t, offs=offs)  # [R, 2I]
        act = F.silu(h[:, 0::2]) * h[:, 1::2]
        return gm(act, w2t, offs=offs)  # [R, H]
    return run


def _dense(a, w13_t, w2_t):
    h = a @ w13_t  # [R, 2I]
    return (F.silu(h[:, 0::2]) * h[:, 1::2]) @ w2_t


def _hf_block():
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception:
        return None
    try:  # the block's constructor and config fields change between transformers versions
        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=TOP_K)
        with torch.device("cuda"):
            block = MixtralSparseMoeBlock(cfg).to(torch.bfloat16).eval()
    except Exception:
        return None
    with torch.no_grad():  # its own random weights (a real routing spread; values do not change GEMM speed)
        for prm in block.parameters():
            prm.normal_(0.0, 0.02)
    return block


def run(device, quick):
    torch.manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda") / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda") / I ** 0.5).to(torch.bfloat16)
    w13t, w2t = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, H, 2I], [E, I, H] column-major views
    dense_w13, dense_w2 = w13[0].t(), w2[0].t()
    gmm = _grouped_mm_fn()
    hf = _hf_block()
    hopper = torch.cuda.get_device_capability()[0] == 9
    peak = device["bf16_matmul_tflops"]
    rows = []
    for T in ([128, 512, 4096] if quick else [65, 128, 256, 512, 2048, 4096, 16384]):
        flops = 6 * (TOP_K * T) * H * I

        def make():
            x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
            route = ops.Route(*reference.moe_route(torch.randn(T, E, device="cuda"), TOP_K))
            return x, route

        sets = [make() for _ in range(2)]  # the weights (2.8 GB) dwarf L2 on their own
        tf = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
        row = {"T": T, "GFLOP": flops / 1e9}
        ms = common.time_fn(lambda x, r: ops.moe_experts(x, r, w13, w2), sets, iters=20)
        row.update(ours_ms=ms, ours_tflops=tf(ms), pct_peak=100 * tf(ms) / peak)
        if T <= 512:
            dec = common.time_fn(_with_path("decode", lambda x, r: ops.moe_experts(x, r, w13, w2)), sets, iters=20)
            row.update(decode_ms=dec)
        if hopper:
            ms80 = common.time_fn(_with_path("sm80", lambda x, r: ops.moe_experts(x, r, w13, w2)), sets, iters=20)
            row.update(sm80_ms=ms80, sm80_tflops=tf(ms80))
        if gmm is not None:
            try:
                gsets = [(x[r.sorted_tokens.long()], r.expert_offsets[1:].contiguous(), w13t, w2t) for x, r in sets]
                gms = common.time_fn(gmm, gsets, iters=20)
                row.update(grouped_mm_ms=gms, grouped_mm_tflops=tf(gms), vs_grouped_mm=gms / ms)
            except Exception as exc:  # unsupported on this GPU / torch build: leave the column empty
                row["grouped_mm_error"] = f"{type(exc).__name__}: {exc}"[:120]
        dsets = [(x[r.sorted_tokens.long()],) for x, r in sets]
        dms = common.time_fn(lambda a: _dense(a, dense_w13, dense_w2), dsets, iters=20)
        row.update(dense_ms=dms, dense_tflops=tf(dms))
        if hf is not None and T <= 4096:
            try:  # transformers' MoE forward differs between versions: a failure there must not end the benchmark
                with torch.no_grad():
                    hms = common.time_fn(lambda x, r: hf(x[None]), sets, warmup=2, iters=5)
                row.update(hf_ms=hms, hf_tflops=tf(hms))
            except Exception as exc:
                row["hf_error"] = f"{type(exc).__name__}: {exc}"[:120]
        rows.append(row)
        del sets
        torch.cuda.empty_cache()
    cols = [("T", "T", None), ("GFLOP", "GFLOP", "{:.0f}"), ("ours_ms", "ours ms", "{:.3f}"),
            ("ours_tflops", "ours TFLOP/s", "{:.0f}"), ("pct_peak", "% matmul rate", "{:.0f}"),
            ("decode_ms", "decode kernels ms", "{:.3f}"), ("sm80_tflops", "sm80 path TFLOP/s", "{:.0f}"),
            ("grouped_mm_tflops", "_grouped_mm TFLOP/s", "{:.0f}"),
            ("vs_grouped_mm", "× _grouped_mm", "{:.2f}"), ("dense_tflops", "dense matmul TFLOP/s", "{:.0f}"),
            ("hf_tflops", "transformers TFLOP/s", "{:.1f}"), ("grouped_mm_error", "_grouped_mm error", None),
            ("hf_error", "transformers error", None)]
    title = (f"moe_experts prefill, E={E} top-{TOP_K} H={H} I={I} bf16 (roofline: {peak} TFLOP/s measured bf16 "
             f"matmul)")
    return title, rows, cols
