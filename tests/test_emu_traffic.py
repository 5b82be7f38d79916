"""Global-memory traffic of the decode kernels, counted by the emulator (it has no clock, but it sees every load):
attention_decode reads each visible K/V byte once, whatever the split count and window; the MoE decode GEMVs read
only the active experts' weights, each byte once (every load instruction counted, not just distinct bytes, at
widths where the K loop has no tail), as the issue's decode budget asks (ratio <= 1.05)."""

import pytest
import torch

from mixtral_ext import emu
from attention_decode_inputs import make_inputs
from moe_experts_inputs import make_weights, ref_route

pytestmark = pytest.mark.usefixtures("emu_built")


def _buffer_reads(name):
    """(every-access bytes, distinct bytes) read from buffer `name` over the launches since reset_stats()."""
    reads = [s["buffers"][name] for s in emu.stats() if name in s["buffers"]]
    return sum(r[0] for r in reads), sum(r[2] for r in reads)


@pytest.mark.parametrize("splits", [0, 1, 3, 7])
@pytest.mark.parametrize("window", [0, 50])
def test_attention_decode_reads_each_visible_kv_byte_once(splits, window):
    lens = [300, 1, 77, 200]
    Hkv, D = 8, 128
    q, k, v, seq_lens = make_inputs(len(lens), max(lens), 32, Hkv, D, lens, dtype=torch.bfloat16, seed=splits)
    emu.reset_stats()
    emu.attention_decode(q, k, v, seq_lens, 0.088, window, splits=splits)
    visible = sum(min(n, window) if window else n for n in lens) * Hkv * D * 2  # bytes of K (and of V)
    for name in ("k_cache", "v_cache"):
        every, distinct = _buffer_reads(name)
        assert distinct == visible, f"{name}: {distinct} distinct bytes read, {visible} visible"
        assert every <= 1.05 * visible, f"{name}: {every / visible:.3f}x the visible bytes"


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("H,I,exact", [(2048, 1024, True), (264, 200, False)])
def test_moe_experts_decode_reads_active_expert_weights_once(T, H, I, exact):
    """Distinct bytes: exactly the active experts' weights. Every load: within 5% where K is a multiple of the
    lanes' stride (at H = 264, I = 200 the K-tail reloads the last vector, a cache hit on a GPU)."""
    E, k = 8, 2
    w13, w2 = make_weights(E, H, I, torch.bfloat16, "cpu", T)
    route = ref_route(torch.randn(T, E, generator=torch.Generator().manual_seed(T)), k)
    active = len(set(route.topk_ids.flatten().tolist()))
    emu.reset_stats()
    emu.moe_experts(torch.randn(T, H).bfloat16(), route, w13, w2, regime="decode")
    for name, per_expert in (("w13", 2 * I * H * 2), ("w2", H * I * 2)):
        every, distinct = _buffer_reads(name)
        assert distinct == active * per_expert, f"{name}: {distinct} bytes read, {active} active experts"
        if exact:
            assert every <= 1.05 * active * per_expert, f"{name}: {every / (active * per_expert):.3f}x"


@pytest.mark.parametrize("mode,H,I,exact", [("int8", 2048, 2048, True), ("int4", 2048, 1024, False)])
def test_moe_experts_quant_decode_reads_active_expert_bytes_once(mode, H, I, exact):
    """The quantized GEMVs read the packed bytes, not a dequantized copy: distinct bytes are exactly the active
    experts' int8 (1 byte a weight) or int4 (half a byte) weights. Every load within 5% of them where K has no tail
    (int8, K = 2048: 128 vectors = 32 lanes x 4 in flight); int4 always has one at T = 1 (a 16-byte vector holds 32
    weights, so the K-split keeps nvec below lanes x k_split x 4), where lanes reload their last vector (L2 hits on
    a GPU, not DRAM bytes)."""
    from mixtral_ext import quant

    T, E, k = 1, 8, 2
    w13, w2 = make_weights(E, H, I, torch.float32, "cpu", 3)
    (q13, s13), (q2, s2) = quant.quantize(w13, mode), quant.quantize(w2, mode)
    route = ref_route(torch.randn(T, E, generator=torch.Generator().manual_seed(5)), k)
    active = len(set(route.topk_ids.flatten().tolist()))
    per_weight = 1 if mode == "int8" else 0.5
    emu.reset_stats()
    emu.moe_experts_quant(torch.randn(T, H).bfloat16(), route, q13, s13, q2, s2, 8 if mode == "int8" else 4)
    for name, per_expert in (("w13", int(2 * I * H * per_weight)), ("w2", int(H * I * per_weight))):
        every, distinct = _buffer_reads(name)
        assert distinct == active * per_expert, f"{mode} {name}: {distinct} bytes read, {active} active experts"
        if exact:
            assert every <= 1.05 * active * per_expert, f"{mode} {name}: {every / (active * per_expert):.3f}x"
