"""moe_experts, prefill regime: the tensor-core grouped GEMMs (csrc/kernels/moe_experts_sm80.cu, moe_experts_sm90.cu)
behind ops.moe_experts.

The static checks on these kernels' machine code (HMMA / ldmatrix / cp.async, HGMMA / TMA / setmaxnreg, no spills,
register counts) are in test_build.py with every other kernel's. GPU (`cuda`): ops.moe_experts against the float32
reference under the 2x rule for T above the decode threshold, skewed routings, Mixtral and awkward shapes, each
code path forced through MIXTRAL_EXT_MOE_PATH (read at every call, so monkeypatch.setenv switches it in-process) and
checked to be the one that ran (profiler kernel names), bf16 and fp16, determinism, CUDA graph replay with a
different routing, no NaN with large activations, MIXTRAL_EXT_MOE_PATH=decode running the decode kernels at
T > threshold, and an unknown MIXTRAL_EXT_MOE_PATH value or a forced path the device cannot run being an error.
Every T here is above moe_experts.h's kMoeExpertsDecodeMaxTokens (64): if that threshold moves up, the smallest T
values of the automatic choice must move with it (the kernel-name check then says so).
"""
import warnings

import pytest
import torch

from moe_experts_inputs import eager_low_rows, make_logits, make_weights, ref_route, reference_fp32
from numerics import assert_2x_rule

# ---- helpers ------------------------------------------------------------------------------------------------------


def launched_kernels(fn):
    """(names of the CUDA kernels fn launches, fn's result), from the torch profiler. The names are None where the
    profiler records no kernels at all (no CUPTI): the caller then cannot tell which path ran, and warns instead of
    failing on a tooling gap."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    names = {evt.name for evt in prof.events() if evt.device_type == torch.autograd.DeviceType.CUDA}
    if not names:
        warnings.warn("torch.profiler recorded no CUDA kernels: the code path that ran is not checked")
        return None, result
    return names, result


def is_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(params=["sm80", "sm90"])
def path(request, monkeypatch):
    """Forces one code path (MIXTRAL_EXT_MOE_PATH) for the test; sm90 only on a Hopper GPU. The default (auto) is
    one of the two; test_auto_picks_the_device_path checks which."""
    if request.param == "sm90" and not is_hopper():
        pytest.skip("the sm90 path needs a compute-capability-9 GPU")
    monkeypatch.setenv("MIXTRAL_EXT_MOE_PATH", request.param)
    return request.param


def expected_kernel(path):
    """Substring of the GEMM kernel name the path must launch."""
    if path == "sm90" or (path == "auto" and is_hopper()):
        return "moe_experts_sm90_kernel"
    return "moe_experts_sm80_kernel"


def check(kernels, T, E, top_k, H, I, kind="random", seed=0, x_scale=1.0, path="auto", dtype=torch.bfloat16):
    dev = getattr(kernels, "device", "cuda")
    torch.manual_seed(seed)
    x = (torch.randn(T, H, device=dev) * x_scale).to(dtype)
    w13, w2 = make_weights(E, H, I, dtype, dev, seed + 1)
    route = ref_route(make_logits(T, E, kind, seed + 2).to(dev), top_k)
    if dev == "cpu":  # the emulator: its launch counters name the kernels that ran
        from mixtral_ext import emu

        emu.reset_stats()
        out = kernels.moe_experts(x, route, w13, w2, regime="prefill")
        names = {st["kernel"] for st in emu.stats()}
    else:
        names, out = launched_kernels(lambda: kernels.moe_experts(x, route, w13, w2))
    want = expected_kernel(path)
    assert names is None or any(want in n for n in names), f"{want} did not run; launched: {sorted(names)}"
    assert out.shape == (T, H) and out.dtype == dtype
    assert_2x_rule(out, reference_fp32(x, route, w13, w2), eager_low_rows(x, route, w13, w2),
                   f"T={T} E={E} k={top_k} H={H} I={I} {kind} path={path} {dtype}")
    return out


# ---- the kernels: on the GPU (each path forced), and the sm_80 path's source emulated on the CPU ---------------


def path_cases(cuda_cases, emu_cases):
    """Parameters for `parametrize("kern, path, case", ..., indirect=["kern"])`: every cuda case on each path (sm90
    needs a Hopper GPU), and the emulator's own, smaller cases on the sm_80 path (it runs every thread on the CPU)."""
    return ([pytest.param("cuda", p, c, marks=pytest.mark.cuda) for p in ("sm80", "sm90") for c in cuda_cases]
            + [pytest.param("emu80", "sm80", c) for c in emu_cases])


@pytest.fixture
def use_path(monkeypatch):
    """use_path(kern, path): forces one code path (MIXTRAL_EXT_MOE_PATH) on the GPU; the emulator's path is its
    arch (80: the mma.sync kernels)."""
    def use(kern, path):
        if kern.name == "cuda":
            if path == "sm90" and not is_hopper():
                pytest.skip("the sm90 path needs a compute-capability-9 GPU")
            monkeypatch.setenv("MIXTRAL_EXT_MOE_PATH", path)
        return path
    return use


@pytest.mark.parametrize("kern, path, T", path_cases([65, 128, 257, 1000, 4096, 8192], [65, 130]), indirect=["kern"])
def test_token_sweep(kern, use_path, path, T):
    H, I = (512, 768) if kern.name == "cuda" else (256, 192)
    check(kern, T, E=8, top_k=2, H=H, I=I, seed=T, path=use_path(kern, path))


@pytest.mark.parametrize("kern, path, case", path_cases([(65, 512, 768), (1000, 1032, 2056), (4096, 4096, 1024)],
                                                        [(65, 264, 136)]), indirect=["kern"])
def test_float16(kern, use_path, path, case):
    """The same kernels instantiated for fp16 (mma/wgmma .f16, fp16 TMA maps, fp16 intermediate)."""
    T, H, I = case
    check(kern, T, E=8, top_k=2, H=H, I=I, seed=T + 1, path=use_path(kern, path), dtype=torch.float16)


@pytest.mark.parametrize("kind", ["one", "two_empty", "single_row"])
@pytest.mark.parametrize("kern, path, case", path_cases([(T, 1024, 512) for T in (65, 1000)], [(65, 128, 128)]),
                         indirect=["kern"])
def test_skewed_routing(kern, use_path, path, kind, case):
    T, H, I = case
    check(kern, T, E=8, top_k=2, H=H, I=I, kind=kind, seed=3 * T, path=use_path(kern, path))


@pytest.mark.parametrize("kern, path, case", path_cases([(3000, 1024, 1024)], [(200, 128, 128)]), indirect=["kern"])
def test_everything_on_one_expert_top1(kern, use_path, path, case):
    T, H, I = case
    check(kern, T, E=8, top_k=1, H=H, I=I, kind="one", seed=11, path=use_path(kern, path))


@pytest.mark.parametrize("kern, path, case", path_cases(
    [(300, H, I) for H, I in [(8, 8), (520, 136), (1032, 2056), (4104, 392), (96, 14336 + 8)]],
    [(70, H, I) for H, I in [(8, 8), (520, 136), (96, 200)]]), indirect=["kern"])
def test_awkward_sizes(kern, use_path, path, case):
    """K not a multiple of the 64-wide k-tile, N not a multiple of the N-tile, tiny dimensions."""
    T, H, I = case
    check(kern, T, E=8, top_k=2, H=H, I=I, seed=H + I, path=use_path(kern, path))


@pytest.mark.parametrize("kern, path, case", path_cases([(513, E, k) for E, k in [(1, 1), (3, 2), (16, 4), (64, 2)]],
                                                        [(70, E, k) for E, k in [(1, 1), (3, 2), (16, 4)]]),
                         indirect=["kern"])
def test_expert_counts(kern, use_path, path, case):
    T, E, top_k = case
    H, I = (256, 384) if kern.name == "cuda" else (128, 128)
    check(kern, T, E=E, top_k=top_k, H=H, I=I, seed=E * 10 + top_k, path=use_path(kern, path))


@pytest.mark.cuda
@pytest.mark.parametrize("T", [257, 4096])
def test_mixtral_shapes(kernels, path, T):
    check(kernels, T, E=8, top_k=2, H=4096, I=14336, seed=T, path=path)


@pytest.mark.parametrize("kern, path, case", path_cases([(200, 256, 256)], [(100, 128, 128)]), indirect=["kern"])
def test_large_activations_no_nan(kern, use_path, path, case):
    """Gate values of several hundred: silu's exp overflows internally and must still give -0, never NaN."""
    T, H, I = case
    out = check(kern, T, E=8, top_k=2, H=H, I=I, seed=5, x_scale=200.0, path=use_path(kern, path))
    assert torch.isfinite(out.float()).all()


@pytest.mark.cuda
def test_both_paths_agree(kernels, monkeypatch):
    if not is_hopper():
        pytest.skip("both paths run only on a Hopper GPU")
    torch.manual_seed(0)
    T, E, H, I = 2048, 8, 2048, 3072
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    w13, w2 = make_weights(E, H, I, torch.bfloat16, "cuda", 1)
    route = ref_route(make_logits(T, E, "random", 2).to("cuda"), 2)
    ref, low = reference_fp32(x, route, w13, w2), eager_low_rows(x, route, w13, w2)
    outs = {}
    for p in ("sm80", "sm90"):
        monkeypatch.setenv("MIXTRAL_EXT_MOE_PATH", p)
        names, outs[p] = launched_kernels(lambda: kernels.moe_experts(x, route, w13, w2))
        assert names is None or any(f"moe_experts_{p}_kernel" in n for n in names), sorted(names)
        assert_2x_rule(outs[p], ref, low, f"path {p}")
    # Both are fp32-accumulated: they differ by accumulation order only, so by a few bf16 output roundings at most.
    scale = ref.abs().max().item()
    assert (outs["sm80"].float() - outs["sm90"].float()).abs().max().item() <= 4 * 2 ** -8 * scale


@pytest.mark.cuda
def test_deterministic(kernels, path):
    torch.manual_seed(1)
    T, E, H, I = 1500, 8, 1024, 1536
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    w13, w2 = make_weights(E, H, I, torch.bfloat16, "cuda", 2)
    route = ref_route(make_logits(T, E, "random", 3).to("cuda"), 2)
    first = kernels.moe_experts(x, route, w13, w2)
    for _ in range(3):
        assert torch.equal(kernels.moe_experts(x, route, w13, w2), first)


@pytest.mark.cuda
def test_graph_replay_with_new_routing(kernels, path):
    """Tile counts come from device-side expert offsets: a captured graph replayed with another routing (same T)
    must give the eager result for that routing, including a routing with empty experts."""
    T, E, H, I = 700, 8, 512, 1024
    torch.manual_seed(2)
    w13, w2 = make_weights(E, H, I, torch.bfloat16, "cuda", 4)
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    route = ref_route(make_logits(T, E, "random", 5).to("cuda"), 2)
    static_route = type(route)(*[t.clone() for t in route])
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            kernels.moe_experts(static_x, static_route, w13, w2)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = kernels.moe_experts(static_x, static_route, w13, w2)
    for kind, seed in (("two_empty", 6), ("one", 7), ("random", 8)):
        x2 = torch.randn(T, H, device="cuda").to(torch.bfloat16)
        r2 = ref_route(make_logits(T, E, kind, seed).to("cuda"), 2)
        static_x.copy_(x2)
        for dst, src in zip(static_route, r2):
            dst.copy_(src)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, kernels.moe_experts(x2, r2, w13, w2)), f"graph replay differs ({kind})"


@pytest.mark.cuda
def test_decode_setting_forces_the_gemvs(kernels, monkeypatch):
    """MIXTRAL_EXT_MOE_PATH=decode above the threshold: no grouped-GEMM kernel runs, the decode GEMVs give the right
    answer (they take any T)."""
    monkeypatch.setenv("MIXTRAL_EXT_MOE_PATH", "decode")
    torch.manual_seed(9)
    T, E, H, I = 300, 8, 512, 512
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    w13, w2 = make_weights(E, H, I, torch.bfloat16, "cuda", 10)
    route = ref_route(make_logits(T, E, "random", 11).to("cuda"), 2)
    names, out = launched_kernels(lambda: kernels.moe_experts(x, route, w13, w2))
    assert names is None or not any("moe_experts_sm" in n for n in names), sorted(names)
    assert names is None or any("moe_experts_gemv_kernel" in n for n in names), sorted(names)
    assert_2x_rule(out, reference_fp32(x, route, w13, w2), eager_low_rows(x, route, w13, w2), "decode path forced")


@pytest.mark.cuda
def test_auto_picks_the_device_path(kernels, monkeypatch):
    """Default (MIXTRAL_EXT_MOE_PATH unset): the sm90 kernels on a Hopper GPU, the sm80 ones elsewhere."""
    monkeypatch.delenv("MIXTRAL_EXT_MOE_PATH", raising=False)
    check(kernels, 1000, E=8, top_k=2, H=1024, I=1024, seed=12, path="auto")


@pytest.mark.cuda
def test_unknown_path_setting_is_an_error(kernels, monkeypatch):
    """A typo in MIXTRAL_EXT_MOE_PATH must not silently run the automatic choice."""
    monkeypatch.setenv("MIXTRAL_EXT_MOE_PATH", "sm_90")
    x = torch.randn(80, 64, device="cuda").to(torch.bfloat16)
    w13, w2 = make_weights(8, 64, 64, torch.bfloat16, "cuda", 13)
    route = ref_route(make_logits(80, 8, "random", 14).to("cuda"), 2)
    with pytest.raises(RuntimeError,
                       match=r"MIXTRAL_EXT_MOE_PATH must be auto, decode, sm80 or sm90 \(unset: auto\), got 'sm_90'"):
        kernels.moe_experts(x, route, w13, w2)


@pytest.mark.cuda
def test_forced_path_that_cannot_run_is_an_error(kernels, monkeypatch):
    """MIXTRAL_EXT_MOE_PATH=sm90 off Hopper: an error naming the path, not a silent fallback to another path."""
    if is_hopper():
        pytest.skip("the sm90 path runs on this GPU")
    monkeypatch.setenv("MIXTRAL_EXT_MOE_PATH", "sm90")
    x = torch.randn(80, 64, device="cuda").to(torch.bfloat16)
    w13, w2 = make_weights(8, 64, 64, torch.bfloat16, "cuda", 15)
    route = ref_route(make_logits(80, 8, "random", 16).to("cuda"), 2)
    with pytest.raises(RuntimeError, match="the sm90 path cannot run"):
        kernels.moe_experts(x, route, w13, w2)
