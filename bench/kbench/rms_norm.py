"""rms_norm (with the fused residual add, as the model calls it): GB/s against the measured copy bandwidth and the
eager PyTorch composite of the same op (add, float32 norm, casts, weight multiply)."""
import torch

import common
from mixtral_ext import ops, reference


def run(device, quick):
    H = 4096
    rows = []
    for T in ([1, 64, 4096] if quick else [1, 8, 64, 512, 4096, 16384]):
        nbytes = 2 * T * H * 2 * 2  # read x and residual, write residual and out (bf16)

        def make():
            return (torch.randn(T, H, device="cuda", dtype=torch.bfloat16),
                    torch.randn(H, device="cuda", dtype=torch.bfloat16),
                    torch.randn(T, H, device="cuda", dtype=torch.bfloat16))

        sets = common.rotating(make, nbytes)
        ours = common.time_fn(lambda x, w, r: ops.rms_norm(x, w, 1e-5, residual=r), sets)
        eager = common.time_fn(lambda x, w, r: reference.rms_norm(x, w, 1e-5, residual=r), sets)
        roof_us = nbytes / (device["copy_gbs"] * 1e9) * 1e6
        rows.append({"T": T, "H": H, "us": ours * 1e3, "GB/s": nbytes / (ours * 1e-3) / 1e9,
                     "roofline_us": roof_us, "pct_roofline": 100 * roof_us / (ours * 1e3),
                     "eager_us": eager * 1e3, "speedup_vs_eager": eager / ours})
    cols = [("T", "T", None), ("H", "H", None), ("us", "µs", "{:.1f}"), ("GB/s", "GB/s", "{:.0f}"),
            ("roofline_us", "roofline µs", "{:.1f}"), ("pct_roofline", "% roofline", "{:.0f}"),
            ("eager_us", "eager µs", "{:.1f}"), ("speedup_vs_eager", "× eager", "{:.1f}")]
    return f"rms_norm + residual, bf16 (roofline: bytes / {device['copy_gbs']} GB/s copy)", rows, cols
