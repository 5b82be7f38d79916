"""attention_prefill: causal GQA prefill (32 query / 8 KV heads, d = 128, bf16, no cached prefix), TFLOP/s with
causal FLOPs counted as half of full (4 n^2 Hq D / 2 per sequence), against scaled_dot_product_attention with each
backend this torch offers (flash, cuDNN, efficient; GQA through enable_gqa, else K/V repeated in memory) and the
measured bf16 matmul rate. Batches hold 16k tokens in all (16 x 1k, 4 x 4k, 1 x 16k)."""
import os

import torch
import torch.nn.functional as F

import common
from mixtral_ext import ops

HQ, HKV, D = 32, 8, 128


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return []
    names = [("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION")]
    return [(label, sdpa_kernel, getattr(SDPBackend, attr)) for label, attr in names if hasattr(SDPBackend, attr)]


def _sdpa_fn(sdpa_kernel, backend, q, k, v):
    """A callable running SDPA with one backend on [B, H, n, D] tensors, or None when the backend refuses the shape.
    Tries enable_gqa first; falls back to K/V repeated to Hq heads (extra memory traffic, noted in the row)."""
    def gqa():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    k_rep, v_rep = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1)

    def repeated():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)

    for fn, how in ((gqa, "enable_gqa"), (repeated, "repeat K/V")):
        try:
            fn()
            torch.cuda.synchronize()
            return fn, how
        except Exception:  # a backend that does not support this shape/dtype/GPU is skipped, not fatal
            continue
    return None, None


def run(device, quick):
    path = os.environ.get("MIXTRAL_EXT_ATTN_PATH", "auto") or "auto"
    rows = []
    for n in ([1024, 4096] if quick else [1024, 4096, 16384]):
        B = max(1, 16384 // n)
        flops = 4 * B * n * n * HQ * D / 2
        q = torch.randn(B * n, HQ, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, n, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, n, HKV, D, device="cuda", dtype=torch.bfloat16)
        cu = torch.arange(0, B * n + 1, n, dtype=torch.int32, device="cuda")
        lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
        scale = D ** -0.5
        # One argument set: attention at these sizes is compute-bound (every K/V tile is reused ~n/128 times).
        ours = common.time_fn(lambda: ops.attention_prefill(q, k, v, cu, lens, n, scale), [()], iters=20)
        row = {"n": n, "B": B, "ms": ours, "TFLOP/s": flops / (ours * 1e-3) / 1e12}
        row["pct_matmul"] = 100 * row["TFLOP/s"] / device["bf16_matmul_tflops"]
        qs = q.view(B, n, HQ, D).transpose(1, 2)
        ks, vs = k.transpose(1, 2), v.transpose(1, 2)
        best = None
        for label, sdpa_kernel, backend in _sdpa_backends():
            fn, how = _sdpa_fn(sdpa_kernel, backend, qs, ks, vs)
            if fn is None:
                row[label] = None
                continue
            t = common.time_fn(fn, [()], iters=20)
            row[label] = flops / (t * 1e-3) / 1e12
            row[f"{label}_how"] = how
            best = t if best is None else min(best, t)
        row["x_best_sdpa"] = best / ours if best else None
        rows.append(row)
        del q, k, v
    cols = [("n", "n", None), ("B", "B", None), ("ms", "ms", "{:.3f}"), ("TFLOP/s", "TFLOP/s", "{:.0f}"),
            ("pct_matmul", "% matmul", "{:.0f}"), ("flash", "SDPA flash", "{:.0f}"),
            ("cudnn", "SDPA cuDNN", "{:.0f}"), ("efficient", "SDPA efficient", "{:.0f}"),
            ("x_best_sdpa", "× best SDPA", "{:.2f}")]
    return (f"attention_prefill causal, 32/8 heads, d=128, bf16, path={path} (TFLOP/s, causal = half; matmul "
            f"{device['bf16_matmul_tflops']} TFLOP/s)"), rows, cols
