"""attention_decode: one query token per sequence against a full bf16 cache (32 query / 8 KV heads, D = 128), GB/s of
cache bytes read (K and V of every visible slot) against the measured copy bandwidth, and against
scaled_dot_product_attention on the same cache (GQA through enable_gqa where available, else K/V repeated in memory),
each SDPA backend this torch offers, the best one reported.

Timing: all calls over a rotating set of caches (together larger than L2) captured in one CUDA graph and replayed, so
launch gaps are excluded as in the graph-captured decode loop and no call finds its cache in L2; µs per call is the
replay median divided by the number of calls. `eager µs` is one op call timed alone (includes host overhead)."""
import torch
import torch.nn.functional as F

import common
from mixtral_ext import ops

HQ, HKV, D = 32, 8, 128


def _graph_us(fn, sets, iters=20):
    """Median µs per call of fn(*args) for args in sets, every call captured in one graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and lazy init) outside the capture
        for args in sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in sets:
            fn(*args)
    ms = common.time_fn(graph.replay, [()], warmup=3, iters=iters)
    del graph
    return ms * 1e3 / len(sets)


def _sdpa_candidates():
    """(label, context manager factory or None) for the default dispatch and each named backend."""
    out = [("default", None)]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return out
    named = (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"))
    for label, attr in named:
        if hasattr(SDPBackend, attr):
            out.append((label, lambda b=getattr(SDPBackend, attr): sdpa_kernel(b)))
    return out


def _sdpa_fn(ctx, gqa):
    """SDPA on the cache laid out [B, S, Hkv, D] (viewed as [B, Hkv, S, D]); q [B, Hq, D] as [B, Hq, 1, D]."""
    extra = {"enable_gqa": True} if gqa else {}

    def call(q, k, v):
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        if not gqa:
            kt, vt = kt.repeat_interleave(HQ // HKV, dim=1), vt.repeat_interleave(HQ // HKV, dim=1)
        if ctx is None:
            return F.scaled_dot_product_attention(q[:, :, None], kt, vt, **extra)
        with ctx():
            return F.scaled_dot_product_attention(q[:, :, None], kt, vt, **extra)
    return call


def _best_sdpa(sets):
    """(µs, how) of the fastest SDPA variant that runs (and captures) on these shapes, or (None, None)."""
    best, how = None, None
    for label, ctx in _sdpa_candidates():
        for gqa in (True, False):
            fn = _sdpa_fn(ctx, gqa)
            try:
                fn(*sets[0])
                torch.cuda.synchronize()
                us = _graph_us(fn, sets)
            except Exception:  # backend refuses the shape / GPU, or no enable_gqa in this torch: try the next
                torch.cuda.synchronize()
                continue
            if best is None or us < best:
                best, how = us, f"{label}{'' if gqa else ' (repeat K/V)'}"
            break  # enable_gqa worked: the repeated variant only adds traffic
    return best, how


def run(device, quick):
    configs = ([(1, 4096), (1, 32768), (16, 4096), (64, 4096)] if quick else
               [(b, n) for b in (1, 16, 64) for n in (1024, 4096, 16384, 32768)])
    scale = D ** -0.5
    rows = []
    for B, n in configs:
        nbytes = 2 * B * n * HKV * D * 2  # K and V of every slot, bf16

        def make():
            q = torch.empty(B, HQ, D, device="cuda", dtype=torch.bfloat16).normal_()
            k = torch.empty(B, n, HKV, D, device="cuda", dtype=torch.bfloat16).normal_()
            v = torch.empty(B, n, HKV, D, device="cuda", dtype=torch.bfloat16).normal_()
            return q, k, v, torch.full((B,), n, dtype=torch.int32, device="cuda")

        sets = common.rotating(make, nbytes)
        ours = _graph_us(lambda q, k, v, lens: ops.attention_decode(q, k, v, lens, scale), sets)
        eager = common.time_fn(lambda q, k, v, lens: ops.attention_decode(q, k, v, lens, scale), sets) * 1e3
        sdpa, how = _best_sdpa([s[:3] for s in sets])
        gbs = nbytes / (ours * 1e-6) / 1e9
        rows.append({"B": B, "context": n, "MB": nbytes / 1e6, "us": ours, "GB/s": gbs,
                     "pct_copy": 100 * gbs / device["copy_gbs"], "eager_us": eager,
                     "sdpa_us": sdpa, "sdpa_GB/s": nbytes / (sdpa * 1e-6) / 1e9 if sdpa else None,
                     "sdpa_how": how, "x_sdpa": sdpa / ours if sdpa else None})
        del sets
        torch.cuda.empty_cache()
    cols = [("B", "B", None), ("context", "context", None), ("MB", "MB read", "{:.0f}"), ("us", "µs", "{:.1f}"),
            ("GB/s", "GB/s", "{:.0f}"), ("pct_copy", "% copy", "{:.0f}"), ("eager_us", "eager µs", "{:.1f}"),
            ("sdpa_us", "SDPA µs", "{:.1f}"), ("sdpa_GB/s", "SDPA GB/s", "{:.0f}"), ("sdpa_how", "SDPA", None),
            ("x_sdpa", "× SDPA", "{:.2f}")]
    return (f"attention_decode, bf16, Hq {HQ} / Hkv {HKV}, D {D}, full contexts (GB/s of K+V read vs "
            f"{device['copy_gbs']} GB/s copy; graph-replayed)"), rows, cols
