"""The emulation runtime's own known-answer tests (csrc/emu/selftest.cu), independent of the project's kernels: warp
collectives, shared-memory freshness, cp.async wait semantics, approximate math within its documented error, bf16 /
fp16 rounding, and that each kind of bug (race, deadlock, out-of-bounds, missing lane) is reported with its sites,
never hidden, never a hang.

Skipped when the emulation extension is not built, unless MIXTRAL_EXT_REQUIRE_BUILD=1 (CI), which makes them fail.
"""
import os
import re

import pytest
import torch

from mixtral_ext import emu

SELFTEST = os.path.join(os.path.dirname(__file__), "..", "csrc", "emu", "selftest.cu")


pytestmark = pytest.mark.usefixtures("emu_built")


def _line(marker):
    """Line number of the selftest.cu line carrying `marker` (reports must name it)."""
    with open(SELFTEST) as f:
        for i, text in enumerate(f, 1):
            if marker in text:
                return i
    raise AssertionError(marker)


def _report(name, bufs, arg):
    with pytest.raises(RuntimeError) as e:
        emu.selftest(name, bufs, arg)
    return str(e.value)


def test_shuffle_reduction_scan_broadcast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g)
    sums, scan, bcast, down = torch.zeros(1), torch.zeros(64), torch.zeros(64), torch.zeros(64)
    emu.selftest("shfl", [x, sums, scan, bcast, down])
    torch.testing.assert_close(sums, x.sum().reshape(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scan, torch.cat([x[:32].cumsum(0), x[32:].cumsum(0)]), rtol=1e-5, atol=1e-5)
    # width 8: every lane gets lane 3 of its own 8-lane segment
    assert torch.equal(bcast, x.view(8, 8)[:, 3:4].expand(8, 8).reshape(64))
    # down by 5: lanes 27..31 of each warp keep their own value
    lane = torch.arange(64) % 32
    expect = torch.where(lane + 5 < 32, x[(torch.arange(64) + 5).clamp(max=63)], x)
    assert torch.equal(down, expect)


def test_ballot_any_all_with_partial_mask():
    x = torch.zeros(64, dtype=torch.int32)
    x[[0, 5, 31]] = 1
    x[32:48] = 1  # warp 1, lanes 0..15: all true within mask 0x0000ffff
    out = torch.zeros(6, dtype=torch.int32)
    emu.selftest("ballot", [x, out])
    got = [v & 0xFFFFFFFF for v in out.tolist()]
    assert got == [(1 << 0) | (1 << 5) | (1 << 31), 1, 0, 0xFFFF, 1, 1]


def test_race_reported_with_both_sites():
    out = torch.zeros(64)
    emu.selftest("race", [out], 0)  # with the barrier: no report, neighbour values
    assert torch.equal(out, ((torch.arange(64) + 1) % 64).float())
    msg = _report("race", [torch.zeros(64)], 1)
    assert "shared-memory race" in msg
    assert f"selftest.cu:{_line('RACE-WRITE')}" in msg and f"selftest.cu:{_line('RACE-READ')}" in msg, msg


def test_shuffle_does_not_order_shared_memory_but_syncwarp_does():
    out = torch.zeros(2)
    emu.selftest("warp_order", [out], 0)
    assert out.tolist() == [10.0, 11.0]
    assert "shared-memory race" in _report("warp_order", [torch.zeros(2)], 1)


def test_atomics_do_not_race_with_each_other_but_plain_reads_do():
    count, out = torch.zeros(1, dtype=torch.int32), torch.zeros(2)
    emu.selftest("atomic", [count, out], 0)
    assert count.item() == 2 * 2 * 64 and out[0].item() == 64.0  # 2 CTAs x 64 threads x 2; each CTA counts 64
    msg = _report("atomic", [torch.zeros(1, dtype=torch.int32), torch.zeros(2)], 1)
    assert "shared-memory race" in msg and "atomicAdd" in msg, msg


def test_barrier_in_divergent_branch_is_reported_not_hung():
    out = torch.zeros(96)
    emu.selftest("deadlock", [out], 0)
    assert torch.equal(out, torch.ones(96))
    msg = _report("deadlock", [torch.zeros(96)], 1)
    assert "exited without reaching the __syncthreads" in msg and "threads 0-31 wait" in msg, msg


def test_deadlock_lists_every_wait_site():
    msg = _report("deadlock", [torch.zeros(96)], 2)
    bar, sw = _line("DEADLOCK-BARRIER"), _line("DEADLOCK-SYNCWARP")
    assert "deadlock" in msg, msg
    assert f"threads 0-31,39,64-95 wait at __syncthreads csrc/emu/selftest.cu:{bar}" in msg, msg
    assert f"threads 32-38,40-63 wait at __syncwarp csrc/emu/selftest.cu:{sw} (mask 0xffffffff)" in msg, msg


def test_global_out_of_bounds_write_names_the_buffer():
    out = torch.zeros(40)
    emu.selftest("oob", [out], 0)
    assert torch.equal(out, torch.arange(40).float())
    msg = _report("oob", [torch.zeros(40)], 1)
    assert "global out-of-bounds write of 4 bytes" in msg and "past the end of buffer 'buf0' (160 bytes" in msg, msg


def test_warp_collective_with_a_lane_missing():
    out = torch.zeros(32)
    emu.selftest("missing_lane", [out], 0)
    assert torch.equal(out, (torch.arange(32) ^ 1).float())
    msg = _report("missing_lane", [torch.zeros(32)], 1)
    assert "lane 5 of warp 0 exited without joining the __shfl_xor_sync" in msg and "lanes 0-4 wait" in msg, msg
    msg = _report("missing_lane", [torch.zeros(32)], 2)
    assert "mismatched warp collectives" in msg and "__ballot_sync" in msg and "__shfl_xor_sync" in msg, msg


def test_cp_async_lands_only_at_the_covering_wait():
    x = torch.arange(32 * 8, dtype=torch.float32)
    out = torch.zeros(3 * 32 * 8)
    emu.selftest("cp_async", [x, out], 0)
    before, mid, after = out.view(3, 32, 8)
    assert torch.isnan(before).all()  # fresh shared memory is NaN, not the copied data
    assert torch.equal(mid[:, :4], x.view(32, 8)[:, :4]) and torch.isnan(mid[:, 4:]).all()  # group 2 still pending
    assert torch.equal(after, x.view(32, 8))
    out = torch.zeros(3 * 32 * 8)
    emu.selftest("cp_async", [x, out], 1)  # second group with src-size 8 of 16: zero fill
    after = out.view(3, 32, 8)[2]
    assert torch.equal(after[:, :6], x.view(32, 8)[:, :6]) and torch.equal(after[:, 6:], torch.zeros(32, 2))


def test_fresh_shared_memory_is_nan_in_every_cta():
    out = torch.zeros(3)
    emu.selftest("fresh_smem", [out])
    assert torch.isnan(out).all()


def _ulps(got, exact64):
    """Distance in float32 ulps of the exact value's magnitude."""
    exact32 = exact64.float()
    ulp = (torch.nextafter(exact32.abs(), torch.tensor(float("inf"))) - exact32.abs()).double()
    return ((got.double() - exact64) / ulp).abs()


def test_approximate_math_within_documented_error_and_not_exact():
    g = torch.Generator().manual_seed(1)
    n = 1000
    x = torch.cat([torch.rand(n // 2, generator=g) * 10 + 1e-3, -torch.rand(n // 2, generator=g) * 20])
    x[: n // 2] = x[: n // 2].abs()
    out = torch.zeros(4 * n)
    emu.selftest("approx", [x, out], n)
    rsq, fexp, fdiv, exp = out.view(4, n)
    xd = x.double()
    pos = x > 0
    d = _ulps(rsq[pos], 1 / xd[pos].sqrt())
    assert d.max() <= 2 + 1e-9 and d.max() >= 1.5  # rsqrtf: 2 ulp, and the emulation uses the bound
    d = _ulps(fexp, xd.exp())
    assert (d <= 2 + torch.floor((1.173 * x.double()).abs()) + 1e-9).all()  # __expf: 2 + floor(|1.173 x|) ulp
    d = _ulps(fdiv, xd / 3)
    assert d.max() <= 2 + 1e-9 and d.max() >= 1.5  # __fdividef: 2 ulp
    d = _ulps(exp, xd.exp())
    assert d.max() <= 2 + 1e-9 and d.max() >= 1.5  # expf: 2 ulp
    out2 = torch.zeros(4 * n)
    emu.selftest("approx", [x, out2], n)
    torch.testing.assert_close(out, out2, rtol=0, atol=0, equal_nan=True)  # deterministic (rsqrt of x < 0: NaN)


def test_bf16_fp16_round_to_nearest_even_and_specials():
    one = 1.0
    bf_ulp, hf_ulp = 2.0 ** -7, 2.0 ** -10
    vals = [
        one + bf_ulp / 2,  # bf16 tie: even (down to 1.0)
        one + 3 * bf_ulp / 2,  # bf16 tie: even (up to 1 + 2 ulp)
        one + hf_ulp / 2, one + 3 * hf_ulp / 2,  # the same for fp16
        -(one + bf_ulp / 2), 65504.0, 65520.0, 65519.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14 * 1.5,
        1e-40, -0.0, float("inf"), float("-inf"), float("nan"), 3.0e38, 1.0e-8, 123.456,
    ]
    x = torch.tensor(vals, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.cat([x, torch.randn(500, generator=g) * 100, torch.randn(500, generator=g) * 1e-5])
    n = x.numel()
    bf, hf = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.float16)
    bf_back, hf_back = torch.zeros(n), torch.zeros(n)
    emu.selftest("convert", [x, bf, hf, bf_back, hf_back], n)
    ref_bf, ref_hf = x.to(torch.bfloat16), x.to(torch.float16)  # torch rounds to nearest even too
    finite = ~torch.isnan(x)
    assert torch.equal(bf.view(torch.int16)[finite], ref_bf.view(torch.int16)[finite])
    assert torch.equal(hf.view(torch.int16)[finite], ref_hf.view(torch.int16)[finite])
    assert torch.isnan(bf[~finite]).all() and torch.isnan(hf[~finite]).all()
    assert bf[0].item() == 1.0 and bf[1].item() == 1.0 + 2 * bf_ulp
    assert hf[2].item() == 1.0 and hf[3].item() == 1.0 + 2 * hf_ulp
    assert torch.equal(bf_back[finite], ref_bf.float()[finite]) and torch.equal(hf_back[finite], ref_hf.float()[finite])


def test_counters_record_global_bytes_per_buffer():
    emu.reset_stats()
    x = torch.randn(64)
    emu.selftest("shfl", [x, torch.zeros(1), torch.zeros(64), torch.zeros(64), torch.zeros(64)])
    (s,) = emu.stats()
    assert re.search(r"shfl_kernel", s["kernel"]) and s["grid"] == [1, 1, 1] and s["block"] == [64, 1, 1]
    assert s["buffers"] == {"buf0": [256, 0, 256], "buf1": [0, 4, 0], "buf2": [0, 256, 0], "buf3": [0, 256, 0],
                            "buf4": [0, 256, 0]}
    assert s["bytes_read"] == 256 and s["bytes_written"] == 4 + 3 * 256


def test_faults_and_spins_are_reports_not_crashes_or_hangs():
    msg = _report("crash", [torch.zeros(32)], 0)
    assert "segmentation fault at address 0x40" in msg and "neither shared memory nor a buffer" in msg, msg
    assert "stack overflowed" in _report("crash", [torch.zeros(32)], 1)
    msg = _report("crash", [torch.zeros(32)], 2)
    assert "without reaching a synchronisation point" in msg and "selftest.cu:" in msg, msg
    out = torch.zeros(64)
    emu.selftest("race", [out], 0)  # the runtime is still usable afterwards
    assert torch.equal(out, ((torch.arange(64) + 1) % 64).float())


def test_every_op_has_an_emulated_binding():
    from mixtral_ext import ops

    missing = [n for n in ops.OP_NAMES if not hasattr(torch.ops.mixtral_emu, n) or not hasattr(emu, n)]
    assert not missing, f"ops without an emulated binding: {missing}"
