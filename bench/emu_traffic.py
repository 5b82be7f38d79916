"""Global-memory traffic of one decode step and one prefill of a Mixtral layer, counted by the CPU emulator.

The emulator has no clock, but it sees every kernel launch and every global load and store of the kernels' exact
source. Per op this prints the launches, the bytes read and written (every access counted, plus the distinct bytes
read), and the minimum an ideal kernel moves: each input / weight / KV byte it needs read once, each output byte
written once. ratio = (read + written) / minimum; above 1 is re-reading (or workspace round trips: the split-KV
partials of attention_decode, the MoE intermediate rows), which on a GPU costs bandwidth unless it hits a cache.

    .venv/bin/python bench/emu_traffic.py            # scaled widths (see below for the time)
    .venv/bin/python bench/emu_traffic.py --real     # Mixtral's real widths (H 4096, I 14336: hours, not practical)

Shapes: Hq 32, Hkv 8, D 128, E 8, k 2 always (attention is at the real head shape); H and I are Mixtral's 4096 /
14336 with --real, else an eighth (512 / 1792: the emulator runs every lane's every load, about 1 MB/s of weights
through the GEMVs and far less through the mma.sync GEMM, so the real widths take hours). Decode: B sequences with
cached lengths --ctx; prefill: --prefill new tokens per sequence on an empty cache. bf16, sm_80 paths. Traffic
ratios do not depend on the widths as long as K is a multiple of the kernels' vector stride (512, 1792 are).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mixtral_ext import emu, reference  # noqa: E402
from mixtral_ext.ops import Route  # noqa: E402

BF = 2  # bytes per bf16 element


def _run(name, fn, minimum, rows):
    emu.reset_stats()
    t0 = time.perf_counter()
    fn()
    secs = time.perf_counter() - t0
    st = emu.stats()
    read = sum(s["bytes_read"] for s in st)
    written = sum(s["bytes_written"] for s in st)
    uniq = sum(v[2] for s in st for v in s["buffers"].values())
    ws = sum(v[0] + v[1] for s in st for b, v in s["buffers"].items() if b not in minimum["buffers"])
    per = {}
    for s in st:
        for b, v in s["buffers"].items():
            acc = per.setdefault(b, [0, 0, 0])
            for i in range(3):
                acc[i] += v[i]
    # buffers read more than once per byte (every access / distinct bytes): re-reads a GPU serves from L1/L2 or not
    notes = [f"{b} {v[0] / v[2]:.2f}x" for b, v in sorted(per.items(), key=lambda kv: -kv[1][0])
             if v[2] and v[0] > 1.05 * v[2]]
    rows.append((name, len(st), read, uniq, written, minimum["bytes"], ws, secs, notes))


def _mb(b):
    return f"{b / 2 ** 20:9.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", action="store_true", help="Mixtral's real H and I (slow)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=256, help="cached tokens per sequence in the decode step")
    ap.add_argument("--prefill", type=int, default=16, help="new tokens per sequence in the prefill")
    args = ap.parse_args(argv)
    if not emu.available():
        raise SystemExit(f"emulation extension unavailable: {emu.status()}")
    H, I = (4096, 14336) if args.real else (512, 1792)
    Hq, Hkv, D, E, K = 32, 8, 128, 8, 2
    B = args.batch
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).bfloat16()
    norm_w = torch.ones(H).bfloat16()
    cs = reference.rope_cos_sin(args.ctx + args.prefill + 1, D, 1e6)
    print(f"widths: H {H}, I {I} ({'real' if args.real else 'scaled to 1/8'}), Hq {Hq}, Hkv {Hkv}, D {D}, E {E}, "
          f"k {K}; bf16, sm_80 paths; MB = 2^20 bytes", flush=True)

    for phase in ("decode", "prefill"):
        rows = []
        n = 1 if phase == "decode" else args.prefill  # new tokens per sequence
        T = B * n
        S = (args.ctx + 1) if phase == "decode" else n
        lens = [S] * B
        x = torch.randn(T, H, generator=g).bfloat16()
        res = torch.randn(T, H, generator=g).bfloat16()
        qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g).bfloat16()
        kc = torch.randn(B, S, Hkv, D, generator=g).bfloat16()
        vc = torch.randn(B, S, Hkv, D, generator=g).bfloat16()
        pos = torch.tensor([p for _ in range(B) for p in range(S - n, S)], dtype=torch.int32)
        seq = torch.tensor([b for b in range(B) for _ in range(n)], dtype=torch.int32)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        logits = torch.randn(T, E, generator=g).bfloat16()
        route = Route(*reference.moe_route(logits.float(), K))
        active = len(set(route.topk_ids.flatten().tolist()))

        _run("rms_norm (fused residual)", lambda: emu.rms_norm(x, norm_w, 1e-5, res.clone()),
             {"bytes": 4 * T * H * BF + H * BF, "buffers": {"x", "weight", "residual", "out"}}, rows)
        _run("rope_kv_append", lambda: emu.rope_kv_append(qkv, pos, seq, cs, kc.clone(), vc.clone()),
             {"bytes": T * (Hq + 2 * Hkv) * D * BF + T * D * 4 + 2 * T * 4 + T * (Hq + 2 * Hkv) * D * BF,
              "buffers": {"qkv", "positions", "seq_ids", "cos_sin", "k_cache", "v_cache", "out", "q"}}, rows)
        kv_min = 2 * sum(lens) * Hkv * D * BF
        if phase == "decode":
            q = torch.randn(B, Hq, D, generator=g).bfloat16()
            _run("attention_decode (auto splits)", lambda: emu.attention_decode(q, kc, vc, seq_lens, D ** -0.5),
                 {"bytes": kv_min + 2 * q.numel() * BF + B * 4,
                  "buffers": {"q", "k_cache", "v_cache", "seq_lens", "out"}}, rows)
            _run("attention_decode (8 splits)",
                 lambda: emu.attention_decode(q, kc, vc, seq_lens, D ** -0.5, splits=8),
                 {"bytes": kv_min + 2 * q.numel() * BF + B * 4,
                  "buffers": {"q", "k_cache", "v_cache", "seq_lens", "out"}}, rows)
        else:
            q = torch.randn(T, Hq, D, generator=g).bfloat16()
            cu = torch.tensor([i * n for i in range(B + 1)], dtype=torch.int32)
            _run("attention_prefill (sm_80)",
                 lambda: emu.attention_prefill(q, kc, vc, cu, seq_lens, n, D ** -0.5),
                 {"bytes": kv_min + 2 * q.numel() * BF + (2 * B + 1) * 4,
                  "buffers": {"q", "k_cache", "v_cache", "cu_seqlens_q", "seq_lens_k", "out"}}, rows)
        _run("moe_route", lambda: emu.moe_route(logits, K),
             {"bytes": T * E * BF + 4 * T * K * 4 + (2 * E + 1) * 4,
              "buffers": {"router_logits", "weights", "ids", "counts", "offsets", "sorted_tokens", "token_rows"}},
             rows)
        regime = "decode" if phase == "decode" else "prefill"
        _run(f"moe_experts ({'GEMVs' if phase == 'decode' else 'sm_80 grouped GEMM'})",
             lambda: emu.moe_experts(x, route, w13, w2, regime=regime),
             {"bytes": active * 3 * I * H * BF + 2 * T * H * BF + T * K * (4 + 4 + 4) + (E + 1) * 4,
              "buffers": {"x", "w13", "w2", "topk_weights", "topk_ids", "expert_offsets", "sorted_tokens",
                          "token_rows", "y"}}, rows)

        print(f"\n{phase}: B {B}, {n} new token(s) per sequence, KV length {S}"
              + f", {active} of {E} experts active")
        print(f"  {'op':<36} {'launch':>6} {'read MB':>9} {'distinct':>9} {'write MB':>9} {'min MB':>9} "
              f"{'ratio':>6} {'wkspc MB':>9} {'emu s':>6}")
        for name, launches, read, uniq, written, minimum, ws, secs, notes in rows:
            print(f"  {name:<36} {launches:>6} {_mb(read)} {_mb(uniq)} {_mb(written)} {_mb(minimum)} "
                  f"{(read + written) / minimum:6.3f} {_mb(ws)} {secs:6.1f}", flush=True)
            if notes:
                print(f"  {'':<36} re-read (every/distinct): {', '.join(notes)}")
    print("\nratio: (every byte read + written) / minimum; distinct: each byte read counted once per launch; "
          "wkspc: traffic of buffers outside the op's inputs and outputs (split partials, intermediate rows); "
          "re-read: buffers whose bytes are loaded more than once per launch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
