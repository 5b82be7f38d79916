"""moe_route: µs per call against the eager PyTorch composite of the same op (softmax, sort/topk, renormalise,
bincount, cumsum, stable sort of the ids, inverse permutation: reference.moe_route), with the bytes-moved roofline.

Both are timed per call with CUDA events (launch overhead included, as a decode step without graphs pays it) and
ours also inside a CUDA graph (the decode loop's cost). At these sizes the roofline is a floor in the noise: the
target is one launch and <= 5 µs at T <= 64, >= 5x the composite everywhere."""
import torch

import common
from mixtral_ext import ops, reference


def run(device, quick):
    E, k = 8, 2
    rows = []
    for T in ([1, 64, 4096] if quick else [1, 8, 64, 512, 4096, 16384]):
        # read bf16 logits; write weights f32 + ids, token_rows, sorted_tokens i32 (4 x T*k x 4 B) + counts/offsets
        nbytes = T * E * 2 + 4 * T * k * 4 + (2 * E + 1) * 4

        def make():
            return (torch.randn(T, E, device="cuda", dtype=torch.bfloat16),)

        sets = common.rotating(make, nbytes)
        ours = common.time_fn(lambda x: ops.moe_route(x, k), sets)
        graph = common.time_graph(lambda x: ops.moe_route(x, k), sets[0])
        eager = common.time_fn(lambda x: reference.moe_route(x, k), sets)
        roof_us = nbytes / (device["copy_gbs"] * 1e9) * 1e6
        rows.append({"T": T, "E": E, "k": k, "launches": 1 if T <= 4096 else 3, "us": ours * 1e3,
                     "graph_us": graph * 1e3, "roofline_us": roof_us, "eager_us": eager * 1e3,
                     "speedup_vs_eager": eager / ours})
    cols = [("T", "T", None), ("E", "E", None), ("k", "k", None), ("launches", "launches", None),
            ("us", "µs", "{:.1f}"), ("graph_us", "µs in graph", "{:.1f}"), ("roofline_us", "roofline µs", "{:.2f}"),
            ("eager_us", "eager µs", "{:.1f}"), ("speedup_vs_eager", "× eager", "{:.1f}")]
    return (f"moe_route, bf16 logits (roofline: bytes / {device['copy_gbs']} GB/s copy; launches: the kernel's "
            "single-block limit is T <= 4096)", rows, cols)
