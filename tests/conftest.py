import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """`cuda` tests need a GPU; without one they are skipped (and reported as skipped, never as passed)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernels():
    """For `cuda` tests of our kernels: fails (not skips) when the extension is missing, so a GPU run can't pass
    by silently testing the reference against itself."""
    import mixtral_ext

    assert mixtral_ext.HAS_CUDA_KERNELS, f"CUDA extension unavailable: {mixtral_ext.EXTENSION_STATUS}"
    return mixtral_ext.ops


def pytest_terminal_summary(terminalreporter):
    """One line per skip reason with its count (e.g. the GPU tests on a CPU machine), instead of a line per test."""
    reasons = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons and "s" not in (terminalreporter.config.option.reportchars or ""):
        terminalreporter.write_sep("-", "skipped")
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{n} skipped: {reason} (pytest -rs lists them)")


class _CudaKernels:
    """The CUDA kernels through mixtral_ext.ops, with the path knobs the emulated backend takes explicitly."""

    name, device = "cuda", "cuda"

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, op):
        return getattr(self.ops, op)

    def attention_decode(self, q, k_cache, v_cache, seq_lens, scale, window=0, splits=0):
        import os

        old = os.environ.get("MIXTRAL_EXT_DECODE_SPLITS")
        try:
            if splits:
                os.environ["MIXTRAL_EXT_DECODE_SPLITS"] = str(splits)
            return self.ops.attention_decode(q, k_cache, v_cache, seq_lens, scale, window)
        finally:
            if splits:
                os.environ.pop("MIXTRAL_EXT_DECODE_SPLITS") if old is None else os.environ.update(
                    MIXTRAL_EXT_DECODE_SPLITS=old)

    def moe_route(self, router_logits, top_k=2, path="auto"):
        return self.ops.moe_route(router_logits, top_k)

    def moe_experts(self, x, route, w13, w2, regime="auto"):
        return self.ops.moe_experts(x, route, w13, w2)

    def moe_experts_quant(self, x, route, w13, w13_scale, w2, w2_scale, bits, regime="auto"):
        assert bits == {torch.int8: 8, torch.uint8: 4}[w13.dtype]
        return self.ops.moe_experts(x, route, w13, w2, w13_scale, w2_scale)


class _EmuKernels:
    """The same kernels' source run on the CPU by the emulator (mixtral_ext.emu), sm_`arch` paths."""

    name, device = "emu", "cpu"

    def __init__(self, emu, arch):
        self.emu, self.arch = emu, arch

    def rms_norm(self, x, weight, eps, residual=None):
        return self.emu.rms_norm(x, weight, eps, residual, arch=self.arch)

    def rope_kv_append(self, *args):
        return self.emu.rope_kv_append(*args, arch=self.arch)

    def attention_prefill(self, *args, **kw):
        return self.emu.attention_prefill(*args, **kw, arch=self.arch)

    def attention_decode(self, q, k_cache, v_cache, seq_lens, scale, window=0, splits=0):
        return self.emu.attention_decode(q, k_cache, v_cache, seq_lens, scale, window, splits=splits, arch=self.arch)

    def moe_route(self, router_logits, top_k=2, path="auto"):
        return self.emu.moe_route(router_logits, top_k, path=path, arch=self.arch)

    def moe_experts(self, x, route, w13, w2, regime="decode"):
        return self.emu.moe_experts(x, route, w13, w2, regime=regime, arch=self.arch)

    def moe_experts_quant(self, x, route, w13, w13_scale, w2, w2_scale, bits, regime="decode"):
        return self.emu.moe_experts_quant(x, route, w13, w13_scale, w2, w2_scale, bits, regime=regime, arch=self.arch)


def backend_cases(cuda_cases, emu_cases, emu_archs=(80,)):
    """Parameters for `@pytest.mark.parametrize("kern, case", backend_cases(...), indirect=["kern"])` (one value
    per case): each case on the real GPU (marked `cuda`) and on the emulator (each of emu_archs; its own, reduced
    cases: it runs every thread on the CPU)."""
    return ([pytest.param("cuda", c, marks=pytest.mark.cuda) for c in cuda_cases]
            + [pytest.param(f"emu{a}", c) for a in emu_archs for c in emu_cases])


def backends(emu_archs=(80,)):
    """Parameters for `@pytest.mark.parametrize("kern", backends(), indirect=True)`: the GPU and the emulator."""
    return [pytest.param("cuda", marks=pytest.mark.cuda)] + [f"emu{a}" for a in emu_archs]


@pytest.fixture
def kern(request):
    """A kernel backend ('cuda', or 'emu80' / 'emu90': the emulator with that architecture's paths): `.device` for
    the inputs and the ops with ops.* signatures plus explicit path keywords."""
    import os

    if request.param == "cuda":
        import mixtral_ext

        assert mixtral_ext.HAS_CUDA_KERNELS, f"CUDA extension unavailable: {mixtral_ext.EXTENSION_STATUS}"
        return _CudaKernels(mixtral_ext.ops)
    from mixtral_ext import emu

    if not emu.available():
        if os.environ.get("MIXTRAL_EXT_REQUIRE_BUILD") == "1":
            pytest.fail(f"MIXTRAL_EXT_REQUIRE_BUILD=1 but the emulation extension is unavailable: {emu.status()}")
        pytest.skip(f"emulation extension not built: {emu.status()}")
    return _EmuKernels(emu, int(request.param[3:]))


@pytest.fixture(params=["cpu", "reference"])
def cpu_impl(request, monkeypatch):
    """For CPU tests that go through mixtral_ext.ops (or the whole model): run them once on the model's CPU path
    (mixtral_ext/cpu.py, what ops.* runs off the GPU) and once on the reference (the oracle), so both stay held to
    transformers and the formulas."""
    import mixtral_ext

    if request.param == "reference":
        monkeypatch.setattr(mixtral_ext.ops, "cpu", mixtral_ext.reference)
    return request.param


@pytest.fixture
def emu_built():
    """For tests of the emulation build: skips without it, fails instead under MIXTRAL_EXT_REQUIRE_BUILD=1 (CI)."""
    import os

    from mixtral_ext import emu

    if not emu.available():
        if os.environ.get("MIXTRAL_EXT_REQUIRE_BUILD") == "1":
            pytest.fail(f"MIXTRAL_EXT_REQUIRE_BUILD=1 but the emulation extension is unavailable: {emu.status()}")
        pytest.skip(f"emulation extension not built: {emu.status()}")
