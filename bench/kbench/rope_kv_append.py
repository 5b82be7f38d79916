"""rope_kv_append: RoPE on q and k of the fused qkv projection with k and v written into a bf16 cache (Mixtral's
32 query / 8 KV heads, D = 128): GB/s against the measured copy bandwidth and the eager PyTorch composite of the same
op (reference.rope_kv_append: gather of the cos/sin rows, float32 rotate-half, index_put into the caches).

Bytes per call: read qkv [T, (Hq + 2 Hkv) D] and the T cos/sin rows (fp32) and the int32 positions / seq_ids, write
q [T, Hq, D] and T slots of k and v. The T tokens go to distinct random (sequence, slot) pairs of one 16 x 4096
cache (T = B = 1..64 is the decode step, larger T a packed prefill); each rotating set has its own qkv and slots.
Ours is also timed inside a CUDA graph (the decode loop's cost)."""
import torch

import common
from mixtral_ext import ops, reference

HQ, HKV, D = 32, 8, 128
B, S = 16, 4096  # cache rows and slots: room for T <= 65536 distinct slots


def run(device, quick):
    k_cache = torch.zeros(B, S, HKV, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    cos_sin = reference.rope_cos_sin(S, D, 1e6, device="cuda")  # [S, D] fp32
    rows = []
    for T in ([1, 64, 4096] if quick else [1, 8, 64, 512, 4096, 16384]):
        # read qkv (bf16), the cos/sin rows (fp32), positions + seq_ids (int32); write q, k and v rows (bf16)
        nbytes = T * ((HQ + 2 * HKV) * D * 2 + D * 4 + 2 * 4 + (HQ + 2 * HKV) * D * 2)

        def make():
            slots = torch.randperm(B * S, device="cuda")[:T]  # distinct: index_put in the reference has no duplicates
            return (torch.randn(T, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16),
                    (slots % S).to(torch.int32), (slots // S).to(torch.int32))

        sets = common.rotating(make, nbytes)
        ours = common.time_fn(lambda qkv, pos, seq: ops.rope_kv_append(qkv, pos, seq, cos_sin, k_cache, v_cache),
                              sets)
        graph = common.time_graph(lambda qkv, pos, seq: ops.rope_kv_append(qkv, pos, seq, cos_sin, k_cache, v_cache),
                                  sets[0])
        eager = common.time_fn(
            lambda qkv, pos, seq: reference.rope_kv_append(qkv, pos, seq, cos_sin, k_cache, v_cache), sets)
        roof_us = nbytes / (device["copy_gbs"] * 1e9) * 1e6
        rows.append({"T": T, "us": ours * 1e3, "graph_us": graph * 1e3, "GB/s": nbytes / (ours * 1e-3) / 1e9,
                     "roofline_us": roof_us, "pct_roofline": 100 * roof_us / (ours * 1e3),
                     "eager_us": eager * 1e3, "speedup_vs_eager": eager / ours})
        del sets
    cols = [("T", "T", None), ("us", "µs", "{:.1f}"), ("graph_us", "µs in graph", "{:.1f}"),
            ("GB/s", "GB/s", "{:.0f}"), ("roofline_us", "roofline µs", "{:.2f}"),
            ("pct_roofline", "% roofline", "{:.0f}"),
            ("eager_us", "eager µs", "{:.1f}"), ("speedup_vs_eager", "× eager", "{:.1f}")]
    return (f"rope_kv_append, bf16, Hq {HQ} / Hkv {HKV}, D {D}, cache {B} x {S} (roofline: bytes / "
            f"{device['copy_gbs']} GB/s copy)", rows, cols)
