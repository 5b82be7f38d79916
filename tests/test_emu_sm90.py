"""The Hopper (sm_90a) part of the emulator (csrc/emu/sm90*.cpp, issue 18): known-answer tests of the emulated
instructions against float math and the documented layouts, then both sm_90a kernels (attention_prefill_sm90 and
the grouped GEMM of moe_experts) through the emulator on reduced shapes against the references, under the 2x rule,
and the setmaxnreg register guards. CPU only; skipped when the emulation extension is not built."""
import pytest
import torch

from attention_prefill_inputs import D, chunked, eager_low, make_inputs, ref_fp32
from mixtral_ext import emu
from moe_experts_inputs import eager_low_rows, make_logits, make_weights, ref_route, reference_fp32
from numerics import assert_2x_rule

DTYPES = [torch.bfloat16, torch.float16]


def _f16(dtype):
    return 1 if dtype == torch.float16 else 0


@pytest.fixture(autouse=True)
def default_registers(emu_built):
    """Every test starts and ends with the default register count (168, what ptxas gives both kernels); through
    emu_built, every test skips (fails under MIXTRAL_EXT_REQUIRE_BUILD=1) without the emulation build."""
    emu.set_num_regs(168)
    yield
    emu.set_num_regs(168)


def kernels_run():
    return [s["kernel"] for s in emu.stats()]


# ---- known-answer tests of the instructions ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [128, 256])
def test_wgmma_ss_kmajor_sw128_matches_float_matmul(dtype, n):
    """wgmma m64nNk16, A and B K-major from 128B-swizzled shared memory (4 k-steps advancing the descriptor's start
    address by 32 bytes inside the swizzled rows), D in the documented fragment layout."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(64, 64, generator=g).to(dtype)
    b = torch.randn(n, 64, generator=g).to(dtype)
    d = torch.full((64, n), float("nan"))
    emu.sm90_selftest(f"wgmma_ss{n}", [a, b, d], [0, _f16(dtype)])
    torch.testing.assert_close(d, a.float() @ b.float().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wgmma_rs_mnmajor_sw128_matches_float_matmul(dtype):
    """wgmma m64n64k16 with A from registers (the m16n8k16 A fragment per warp) and B MN-major (imm-trans-b = 1) from
    128B-swizzled shared memory, 8-key groups at the stride-dimension byte offset."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 64, generator=g).to(dtype)
    b = torch.randn(64, 64, generator=g).to(dtype)
    d = torch.full((64, 64), float("nan"))
    emu.sm90_selftest("wgmma_rs", [a, b, d], [0, _f16(dtype)])
    torch.testing.assert_close(d, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


def test_wgmma_reports_and_stale_accumulators():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(64, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(128, 64, generator=g).to(torch.bfloat16)
    d = torch.zeros(64, 128)
    with pytest.raises(RuntimeError, match="no\\s+fence.proxy.async"):
        emu.sm90_selftest("wgmma_ss128", [a, b, d], [1, 0])
    with pytest.raises(RuntimeError, match="no wgmma.fence"):
        emu.sm90_selftest("wgmma_ss128", [a, b, d], [4, 0])
    # Accumulators read before the covering wait_group hold their old values (zeros here), not the product.
    emu.sm90_selftest("wgmma_ss128", [a, b, d], [2, 0])
    assert torch.equal(d, torch.zeros(64, 128))
    with pytest.raises(RuntimeError, match="changed its A registers"):
        emu.sm90_selftest("wgmma_rs", [a, b[:64].contiguous(), torch.zeros(64, 64)], [1, 0])


@pytest.mark.parametrize("x,y,rows", [(0, 0, 16), (64, 8, 16), (96, 40, 24), (-32, -4, 8)])
def test_tma_box_with_swizzle_and_oob_fill(x, y, rows):
    """cp.async.bulk.tensor.2d with an emulated cuTensorMapEncodeTiled map (box 64 x rows, 128B swizzle, zero OOB
    fill) over a [48][136] bf16 tensor: the box, un-swizzled by the documented pattern, equals the tensor's window
    with zeros outside; the mbarrier completes on the box's full byte count."""
    R, C = 48, 136
    src = torch.arange(R * C, dtype=torch.float32).reshape(R, C).remainder(251).to(torch.bfloat16)
    out = torch.full((rows, 64), float("nan"), dtype=torch.bfloat16)
    emu.sm90_selftest("tma", [src, out], [0, 0, R, C, x, y, rows])
    want = torch.zeros(rows, 64, dtype=torch.bfloat16)
    for r in range(rows):
        for c in range(64):
            if 0 <= y + r < R and 0 <= x + c < C:
                want[r, c] = src[y + r, x + c]
    assert torch.equal(out, want)


def test_tma_short_expect_tx_and_wrong_parity_are_reported():
    R, C = 32, 64
    src = torch.randn(R, C).to(torch.bfloat16)
    out = torch.zeros(16, 64, dtype=torch.bfloat16)
    # One chunk short: the transaction count passes zero and never returns to it; the waiters deadlock.
    with pytest.raises(RuntimeError, match="deadlock.*mbarrier.try_wait"):
        emu.sm90_selftest("tma", [src, out], [1, 0, R, C, 0, 0, 16])
    # Parity 1 on a fresh barrier passes at once: the reads race with the copy's writes... or see unwritten NaN.
    with pytest.raises(RuntimeError, match="race"):
        emu.sm90_selftest("tma", [src, out], [2, 0, R, C, 0, 0, 16])


def test_mbarrier_ring_phase_protocol():
    """A 2-slot producer/consumer ring over 7 iterations (parities flip every other use of a slot)."""
    out = torch.full((7, 32), float("nan"))
    emu.sm90_selftest("mbar_ring", [out], [0, 0, 7])
    want = torch.tensor([[i * 100 + lane for lane in range(32)] for i in range(7)], dtype=torch.float32)
    assert torch.equal(out, want)


@pytest.mark.parametrize("arg,match", [(1, "race"), (2, "race.*thread 31 wrote"), (3, "deadlock.*mbarrier.try_wait")])
def test_mbarrier_protocol_bugs_are_reported(arg, match):
    """1: the consumer waits on the wrong parity (reads before the data is published); 2: full's count is one short
    (the phase completes before the last producer lane's arrival, which lands in the next phase: its write is not
    ordered before the read); 3: the producer skips its last arrival (a deadlock report, not a hang)."""
    out = torch.zeros(7, 32)
    with pytest.raises(RuntimeError, match=match):
        emu.sm90_selftest("mbar_ring", [out], [arg, 0, 7])


def test_setmaxnreg_pool_and_named_barriers():
    """With numRegs 168, warpgroup 0 returning down to 40 or 104 funds warpgroup 1's 232; named barrier 1 (bar.arrive
    then bar.sync, 256 threads) hands shared data over. Returning only down to 160 cannot fund it: a deadlock report
    naming setmaxnreg.inc, never a hang."""
    for dec in (40, 104):
        out = torch.zeros(256)
        emu.sm90_selftest("regs", [out], [dec])
        assert torch.equal(out[:128], torch.arange(128, 256, dtype=torch.float32))
        assert torch.equal(out[128:], torch.ones(128))
    with pytest.raises(RuntimeError, match="deadlock.*setmaxnreg.inc"):
        emu.sm90_selftest("regs", [torch.zeros(256)], [160])


# ---- attention_prefill_sm90 ------------------------------------------------------------------------------------------


def attention_case(new_lens, prefix_lens, window=0, dtype=torch.bfloat16, slack=5, seed=0):
    q, k, v, cu_t, lens_t, max_q, cu, lens = make_inputs(new_lens, prefix_lens, 8, 2, dtype, "cpu", slack, seed, 1.0,
                                                         stale=float("nan"))
    scale = D ** -0.5
    emu.reset_stats()
    out = emu.attention_prefill(q, k, v, cu_t, lens_t, max_q, scale, window, arch=90)
    ref = chunked(ref_fp32, q, k, v, cu, lens, scale, window)
    low = chunked(eager_low, q, k, v, cu, lens, scale, window)
    what = f"emulated attention_prefill sm90 {dtype} new={new_lens} prefix={prefix_lens} window={window}"
    assert out.shape == q.shape and out.dtype == dtype
    assert_2x_rule(out, ref, low, what=what)
    return kernels_run()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 15, 64, 65, 130, 200])
def test_attention_prefill_sm90_lengths(dtype, n):
    """head_dim 128, 4 query heads per KV head (8 / 2), causal, no cache."""
    names = attention_case([n], [0], dtype=dtype, seed=n)
    assert any("attention_prefill_sm90_kernel" in k for k in names), names


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_prefill_sm90_cached_prefix_ragged_batch(dtype):
    """A ragged batch with cached prefixes; the 1-token sequence sees 501 keys = 4 tiles, so the 3-stage ring wraps
    (parities flip, slots are reused)."""
    attention_case([37, 1, 130], [90, 500, 3], dtype=dtype, seed=7)


@pytest.mark.parametrize("window", [1, 50, 129])
def test_attention_prefill_sm90_window(window):
    attention_case([160, 9], [100, 300], window=window, seed=window)


def test_attention_prefill_register_guard_declines_to_sm80():
    """With fewer than 168 registers the 40 / 232 setmaxnreg split cannot balance (the consumers' .inc would wait
    forever): the launcher runs the sm_80 kernel instead, which passes, and no sm_90a kernel is launched."""
    emu.set_num_regs(160, "attention_prefill_sm90_kernel")
    names = attention_case([65], [10], seed=1)
    assert not any("attention_prefill_sm90_kernel" in k for k in names), names
    assert any("attention_prefill" in k for k in names), names


# ---- the grouped GEMM (moe_experts, prefill regime) ------------------------------------------------------------------


def moe_case(T, kind="random", E=8, top_k=2, H=64, I=64, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(T, H).to(dtype)
    w13, w2 = make_weights(E, H, I, dtype, "cpu", seed + 1)
    route = ref_route(make_logits(T, E, kind, seed + 2), top_k)
    emu.reset_stats()
    out = emu.moe_experts(x, route, w13, w2, regime="prefill", arch=90)
    assert out.shape == (T, H) and out.dtype == dtype
    assert_2x_rule(out, reference_fp32(x, route, w13, w2), eager_low_rows(x, route, w13, w2),
                   f"emulated moe_experts sm90 T={T} {kind} H={H} I={I} {dtype}")
    return kernels_run()


@pytest.mark.parametrize("T", [1, 7, 64, 130])
def test_moe_grouped_gemm_sm90_tokens(T):
    """E = 8, top-2, the smallest H and I the Hopper path takes (multiples of 8; 64 = one k-tile), bf16."""
    names = moe_case(T, seed=T)
    assert sum("moe_experts_sm90_kernel" in k for k in names) == 2, names


@pytest.mark.parametrize("kind", ["two_empty", "one", "single_row"])
def test_moe_grouped_gemm_sm90_routing(kind):
    """Experts with no tokens; all tokens on one expert; an expert with a single row."""
    moe_case(64, kind=kind, seed=5)


@pytest.mark.parametrize("H,I", [(136, 72), (200, 24)])
def test_moe_grouped_gemm_sm90_partial_tiles_fp16(H, I):
    """K and N not multiples of the tiles (TMA zero-fills the box edges), fp16."""
    moe_case(33, H=H, I=I, dtype=torch.float16, seed=H)


@pytest.mark.parametrize("T", [64, 130])
def test_moe_grouped_gemm_sm90_ring_wraps(T):
    """H = 512: GEMM1 walks 8 k-tiles per output tile, more than the ring has stages, so every slot is reused and
    the empty / full parities flip."""
    moe_case(T, H=512, I=64, seed=T + 1)


def test_moe_register_guard_declines_to_sm80():
    emu.set_num_regs(160, "moe_experts_sm90_kernel")
    names = moe_case(20, seed=2)
    assert not any("moe_experts_sm90_kernel" in k for k in names), names
    assert any("moe_experts_sm80" in k for k in names), names
