"""The model's CPU path (mixtral_ext/cpu.py): each op against the float32 reference, the bf16 model against
transformers' own bf16 error, memory linear in the prompt at 16k tokens, and no more aten calls per decode layer
than transformers (counted with torch.profiler). The float32 transformers parity tests are in test_model.py."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import common  # noqa: E402  (bench/common.py: the aten-call counter bench_cpu.py reports)
import mixtral_ext as mx  # noqa: E402
from mixtral_ext import cpu, reference
from mixtral_ext.model import KVCache
from checkpoints import CONFIGS, hf_checkpoint, hf_model
from numerics import assert_2x_rule

transformers = pytest.importorskip("transformers")


# ---- ops against the reference --------------------------------------------------------------------------------------

def attention_inputs(B, S, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape in ((B, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D))]


@pytest.mark.parametrize("lens,window", [([1], 0), ([37], 0), ([37, 1, 20], 0), ([30, 12], 7), ([0, 5], 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_decode_valid_slots_only(lens, window, dtype):
    """Slots past each length hold stale values that would show in the output if attended to (the reference gets
    zeros there). NaN at batch 1, where the cache is cut at the length; in a ragged batch the slots between a
    sequence's length and the longest are read and masked, so, as for the reference, they must be finite (KVCache
    starts zeroed)."""
    B, S, Hq, Hkv, D = len(lens), 48, 8, 2, 16
    q, k, v = attention_inputs(B, S, Hq, Hkv, D, dtype, seed=sum(lens))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    for b, n in enumerate(lens):
        k[b, n:], v[b, n:] = (float("nan"), float("nan")) if B == 1 else (30.0, 1e4)
    k0, v0 = k.clone(), v.clone()
    for b, n in enumerate(lens):
        k0[b, n:], v0[b, n:] = 0.0, 0.0
    out = cpu.attention_decode(q, k, v, seq_lens, 0.25, window)
    ref = reference.attention_decode(q.float(), k0.float(), v0.float(), seq_lens, 0.25, window)
    assert out.dtype == dtype and not out.isnan().any()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:  # the 2x rule, against the float32 result rounded once to bf16 (stricter than eager bf16 math)
        low = reference.attention_decode(q.float(), k0.float(), v0.float(), seq_lens, 0.25, window).to(dtype)
        assert_2x_rule(out[seq_lens > 0], ref[seq_lens > 0], low[seq_lens > 0], "decode bf16")
    assert torch.count_nonzero(out[seq_lens == 0]) == 0


@pytest.mark.parametrize("new,prefix,window", [([700], [0], 0), ([700], [0], 100), ([600, 3], [0, 9], 0),
                                               ([5, 530], [40, 300], 64)])
def test_attention_prefill_blocks_match_reference(new, prefix, window):
    """Prompts longer than PREFILL_BLOCK with a cached prefix and/or a sliding window take the blocked path."""
    Hq, Hkv, D = 4, 2, 32
    g = torch.Generator().manual_seed(len(new) + window)
    lens = [p + n for p, n in zip(prefix, new)]
    q = torch.randn(sum(new), Hq, D, generator=g)
    k, v = torch.randn(len(new), max(lens), Hkv, D, generator=g), torch.randn(len(new), max(lens), Hkv, D, generator=g)
    cu = torch.tensor([0] + new).cumsum(0).to(torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    out = cpu.attention_prefill(q, k, v, cu, lens_t, max(new), D ** -0.5, window)
    ref = reference.attention_prefill(q, k, v, cu, lens_t, max(new), D ** -0.5, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (37, 8, 2), (64, 5, 3), (9, 4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("I", [48, 6])  # 6: rows of 12 or 24 bytes, which torch._grouped_mm refuses (the loop)
def test_moe_matches_reference(T, E, k, dtype, I):
    """Routing is the reference's exactly (ids, permutation, tie rule on low-precision logits); the experts in
    float32 agree to rounding, in bf16 within the 2x rule against the same GEMMs done in bf16 by eager PyTorch."""
    g = torch.Generator().manual_seed(T * E + k)
    H = 32
    logits = torch.randint(-3, 4, (T, E), generator=g).to(dtype)  # many ties
    got, want = cpu.moe_route(logits, k), reference.moe_route(logits, k)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / math.sqrt(I)).to(dtype)
    args = (x, *want[:2], want[3], *want[4:], w13, w2)
    out = cpu.moe_experts(*args)
    ref = reference.moe_experts(x.float(), *want[:2], want[3], *want[4:], w13.float(), w2.float())
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        low = torch.zeros(T, H, dtype=dtype)
        for t in range(T):  # per token in bf16: each expert's GEMMs rounded to bf16, the weighted sum in bf16
            for s in range(k):
                e = int(want[1][t, s])
                h = x[t] @ w13[e].t()
                low[t] += (torch.nn.functional.silu(h[0::2]) * h[1::2]) @ w2[e].t() * want[0][t, s].to(dtype)
        assert_2x_rule(out, ref, low, f"moe_experts bf16 T={T}")


def test_moe_route_nonfinite_logits_like_the_reference():
    logits = torch.tensor([[0.0, float("nan"), 1.0, float("inf")], [float("-inf"), 2.0, float("nan"), float("nan")],
                           [1.0, 1.0, 1.0, 1.0]])
    for a, b in zip(cpu.moe_route(logits, 2), reference.moe_route(logits, 2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_rms_norm_and_rope_match_reference():
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        x, r, w = (torch.randn(shape, generator=g).to(dtype) for shape in ((7, 40), (7, 40), (40,)))
        r2 = r.clone()
        assert torch.equal(cpu.rms_norm(x, w, 1e-5, r), reference.rms_norm(x, w, 1e-5, r2)) and torch.equal(r, r2)
        T, Hq, Hkv, D, B, S = 6, 4, 2, 10, 2, 9
        qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g).to(dtype)
        pos = torch.tensor([0, 3, 8, 1, 2, 7], dtype=torch.int32)
        seq = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32)
        cs = reference.rope_cos_sin(16, D, 10000.0)
        caches = [torch.zeros(B, S, Hkv, D, dtype=dtype) for _ in range(4)]
        q = cpu.rope_kv_append(qkv, pos, seq, cs, *caches[:2])
        q_ref = reference.rope_kv_append(qkv, pos, seq, cs, *caches[2:])
        tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
        for a, b in zip((q, *caches[:2]), (q_ref, *caches[2:])):
            torch.testing.assert_close(a, b, **tol)  # bf16: float32 math rounded once, both sides


# ---- the bf16 model against transformers' bf16 ---------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_model_error_at_most_twice_transformers(name):
    """Logits of the full forward and of decode steps after a prefill: error against the float32 model at most 2x
    the error of transformers' own bf16 model on the same weights (plus rounding noise)."""
    hf32, path = hf_checkpoint(name)
    hf16 = hf_model(name, dtype=torch.bfloat16)  # same seed: the same weights, rounded
    ours = mx.Mixtral.from_pretrained(path, dtype=torch.bfloat16, progress=False)
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (2, 14), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, low = hf32(ids).logits, hf16(ids).logits
    assert_2x_rule(ours(ids), ref, low, f"{name} forward")
    # Prefill 11 tokens, then decode 3: the logits of each step against the forward's at that position.
    cache = KVCache(ours.config, 2, 14, "cpu", torch.bfloat16)
    with torch.inference_mode():
        steps = [ours.prefill(ids[:, :11].tolist(), cache)]
        positions = torch.full((2,), 11, dtype=torch.int32)
        for i in range(11, 14):
            steps.append(ours.decode_step(ids[:, i], positions, torch.arange(2, dtype=torch.int32), cache))
            positions += 1
    assert_2x_rule(torch.stack(steps, 1), ref[:, 10:], low[:, 10:], f"{name} prefill + decode")


# ---- memory linear in the prompt -------------------------------------------------------------------------------------

_PEAK = textwrap.dedent("""
    import sys, torch
    import mixtral_ext as mx
    from mixtral_ext.model import KVCache

    def status(field):  # kB -> bytes
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    torch.set_num_threads(1)
    n, window = int(sys.argv[1]), int(sys.argv[2]) or None
    cfg = mx.MixtralConfig.from_name("tiny", vocab_size=256, num_hidden_layers=1, max_position_embeddings=n,
                                     sliding_window=window)
    model = mx.Mixtral(cfg).eval()
    for p in model.parameters():
        p.normal_(0.0, 0.02)
    ids = torch.randint(0, 256, (n,)).tolist()
    with torch.inference_mode():
        cache = KVCache(cfg, 1, n, "cpu", torch.float32)
        model.prefill([ids[:600]], cache)  # warm-up: one-time allocations are not the prompt's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident size (VmHWM) to the current one
        base = status("VmRSS")
        model.prefill([ids], cache)
    print(status("VmHWM") - base)
""")


def peak_bytes(n, window):
    """Peak resident memory a prefill of n tokens adds, in a fresh process: its peak resident size (VmHWM, reset
    after a warm-up) minus its resident size before the prefill. Not getrusage's ru_maxrss: a child forked from a
    large process (pytest, holding models) can start with the parent's peak."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PEAK, str(n), str(window)], capture_output=True, text=True,
                         env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("window", [0, 1000])
def test_16k_prefill_memory_is_linear(window):
    """A 16k-token prompt on a one-layer tiny model (hidden 64, 4 query heads): scores for the whole prompt would
    be 4 * 16384^2 * 4 bytes = 4 GiB; linear memory is a few KB per token. Bounded two ways: at most 16 KB per
    token plus 64 MB (the blocked path's [512, L] masks included), and at most 3x the per-token cost of a 2k prompt
    (quadratic growth would be 8x)."""
    small, large = 2048, 16384
    grow_small, grow_large = peak_bytes(small, window), peak_bytes(large, window)
    assert grow_large <= large * 16 * 1024 + (64 << 20), f"{grow_large / 2**20:.0f} MB for {large} tokens"
    assert grow_large / large <= 3 * max(grow_small, 1 << 20) / small, (
        f"{grow_large / 2**20:.0f} MB at {large} tokens against {grow_small / 2**20:.0f} MB at {small}")


# ---- dispatcher calls per decode layer ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_layer_op_count(dtype):
    """One batch-1 decode step: no more aten calls issued per layer than transformers' (what each call costs in
    Python and dispatcher overhead), and no cast that does nothing (an aten::to that returns its input)."""
    name = "gqa3_odd"
    _, path = hf_checkpoint(name)
    ours = mx.Mixtral.from_pretrained(path, dtype=dtype, progress=False)
    hf = hf_model(name, dtype=dtype)
    hf.set_attn_implementation("sdpa")  # transformers' default (the parity tests use eager)
    prompt = torch.arange(1, 9)[None]
    with torch.inference_mode():
        cache = KVCache(ours.config, 1, 16, "cpu", dtype)
        nxt = ours.prefill(prompt.tolist(), cache).argmax(-1)
        pos, seq = torch.tensor([8], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        _, mine = common.layer_aten_events(ours.layers, lambda: ours.decode_step(nxt, pos, seq, cache))
        out = hf(input_ids=prompt, use_cache=True)
        _, theirs = common.layer_aten_events(hf.model.layers, lambda: hf(
            input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True))
    ours_per_layer, hf_per_layer = len(mine) / len(ours.layers), len(theirs) / len(hf.model.layers)
    assert ours_per_layer <= hf_per_layer, f"{ours_per_layer:.1f} aten calls per layer, transformers {hf_per_layer:.1f}"
    no_ops = [e for e in mine if e.name == "aten::to" and not e.cpu_children]
    assert not no_ops, f"{len(no_ops) / len(ours.layers):.1f} casts per layer that do nothing"
