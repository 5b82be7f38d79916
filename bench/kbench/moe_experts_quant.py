"""moe_experts_quant (moe_experts for the bf16 row) at decode sizes with bf16, int8 and int4 experts, Mixtral shapes
(H 4096, I 14336, 8 experts, top-2, bf16 activations): µs per MoE layer (GEMVs + combine) and achieved GB/s on the bytes each format actually reads -
the active experts' weights at their stored size (2, 1 or 0.5 bytes a weight) plus their float32 scales - against
the measured copy bandwidth. T = 1 and 8 (2 and ~7 active experts under a uniform router).

The same routes and inputs for the three formats; routes and inputs rotate over a few sets. The weights (0.7 GB per
expert in bf16) are far larger than L2, so they need no rotation."""
import torch

import common
from mixtral_ext import ops, quant
from mixtral_ext.config import MixtralConfig

H, I, E, K = 4096, 14336, 8, 2


def _weights(g):
    """bf16 experts and their int8 / int4 quantizations, built expert by expert (one fp32 expert at a time)."""
    w13 = torch.empty(E, 2 * I, H, device="cuda", dtype=torch.bfloat16)
    w2 = torch.empty(E, H, I, device="cuda", dtype=torch.bfloat16)
    for e in range(E):
        w13[e] = torch.randn(2 * I, H, device="cuda", generator=g) / H ** 0.5
        w2[e] = torch.randn(H, I, device="cuda", generator=g) / I ** 0.5
    formats = {"bf16": (w13, w2, None, None)}
    for mode in quant.MODES:
        q13, s13 = zip(*(quant.quantize(w13[e], mode) for e in range(E)))
        q2, s2 = zip(*(quant.quantize(w2[e], mode) for e in range(E)))
        formats[mode] = (torch.stack(q13), torch.stack(q2), torch.stack(s13), torch.stack(s2))
    return formats


def run(device, quick):
    g = torch.Generator(device="cuda").manual_seed(0)
    formats = _weights(g)
    cfg = MixtralConfig()
    per_expert = {"bf16": quant.expert_bytes(cfg, None, 2) / E, "int8": quant.expert_bytes(cfg, "int8", 2) / E,
                  "int4": quant.expert_bytes(cfg, "int4", 2) / E}
    rows = []
    for T in (1, 8):
        sets, active = common.routed_inputs(T, H, E, K, g)
        base = None
        for name, (w13, w2, s13, s2) in formats.items():
            ms = common.time_fn(lambda x, route: ops.moe_experts(x, route, w13, w2, s13, s2), sets)
            nbytes = active * per_expert[name]
            gbs = nbytes / (ms * 1e-3) / 1e9
            base = ms if name == "bf16" else base
            rows.append({"T": T, "format": name, "active_experts": active, "MB": nbytes / 1e6, "us": ms * 1e3,
                         "GB/s": gbs, "pct_copy": 100 * gbs / device["copy_gbs"], "speedup_vs_bf16": base / ms})
    cols = [("T", "T", None), ("format", "experts", None), ("active_experts", "active experts", "{:.2f}"),
            ("MB", "MB read", "{:.0f}"), ("us", "µs", "{:.0f}"), ("GB/s", "GB/s", "{:.0f}"),
            ("pct_copy", "% copy BW", "{:.0f}"), ("speedup_vs_bf16", "× bf16", "{:.2f}")]
    return (f"moe_experts decode, Mixtral shapes, bf16 / int8 / int4 experts (GB/s = bytes read: active experts' "
            f"stored weights + scales / time; copy {device['copy_gbs']} GB/s)", rows, cols)
