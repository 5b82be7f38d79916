"""moe_experts: the reference against transformers' MixtralSparseMoeBlock (CPU, CI) and the CUDA op (decode GEMVs,
or the grouped GEMM above the decode threshold, then the combine) against the reference under the 2x rule (GPU)."""
import pytest
import torch

from conftest import backend_cases, backends
from mixtral_ext import ops, reference
from moe_experts_inputs import active_only_route, eager_low, make_weights, ref_route, route_args, routed
from numerics import assert_2x_rule


def interleave_gate_up(gate_up):
    """transformers stores [E, 2I, H] as all gate rows then all up rows; our w13 interleaves them by row."""
    E, I2, H = gate_up.shape
    I = I2 // 2
    return torch.stack([gate_up[:, :I], gate_up[:, I:]], dim=2).reshape(E, I2, H).contiguous()


# ---- CPU: the reference -----------------------------------------------------------------------------------------

@pytest.mark.usefixtures("cpu_impl")
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (5, 8, 2), (37, 8, 2), (16, 4, 1), (12, 16, 4)])
def test_reference_matches_transformers_block(T, E, k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    H, I = 48, 80
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    block = MixtralSparseMoeBlock(cfg).eval()
    g = torch.Generator().manual_seed(T * 13 + E + k)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(E, H, generator=g))
        block.experts.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g) / H ** 0.5)
        block.experts.down_proj.copy_(torch.randn(E, H, I, generator=g) / I ** 0.5)
        x = torch.randn(1, T, H, generator=g)
        expected = block(x)[0]
        logits = x[0] @ block.gate.weight.t()
        route = ops.moe_route(logits, k)
        w13 = interleave_gate_up(block.experts.gate_up_proj)
        y = ops.moe_experts(x[0], route, w13, block.experts.down_proj)
    assert y.dtype == torch.float32 and y.shape == (T, H)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_reference_interleave_is_gate_up_pairs():
    gate_up = torch.arange(2 * 3 * 2 * 1, dtype=torch.float32).view(2, 6, 1)  # E=2, I=3, H=1
    w13 = interleave_gate_up(gate_up)
    assert torch.equal(w13[:, 0::2], gate_up[:, :3]) and torch.equal(w13[:, 1::2], gate_up[:, 3:])


@pytest.mark.usefixtures("cpu_impl")
def test_reference_skips_empty_experts_and_uses_only_routed_ones():
    """Experts nobody picks never contribute: NaN weights there must not leak into the output."""
    T, E, H, I = 6, 8, 16, 24
    x = torch.randn(T, H)
    logits = torch.randn(T, E)
    logits[:, 1] += 40
    logits[:, 6] += 30
    route = ops.Route(*reference.moe_route(logits, 2))
    w13, w2 = make_weights(E, H, I, torch.float32, "cpu", 0)
    w13[[0, 2, 3, 4, 5, 7]] = float("nan")
    y = reference.moe_experts(x, *route_args(route), w13, w2)
    assert not torch.isnan(y).any()


def test_opcheck_cpu():
    T, E, H, I = 5, 4, 16, 24
    route = ops.moe_route(torch.randn(T, E), 2)
    w13, w2 = make_weights(E, H, I, torch.float32, "cpu", 1)
    args = (torch.randn(T, H), *route_args(route), w13, w2)
    torch.library.opcheck(torch.ops.mixtral_ext.moe_experts.default, args)


def test_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mixtral_ext::moe_experts", "CompositeExplicitAutograd")


# ---- the kernel: on the GPU, and its source emulated on the CPU (the decode GEMVs; reduced widths) -------------

_WEIGHTS = {}


def cached_weights(E, H, I, dtype, device="cuda"):
    """Mixtral-size weights are 2.8 GB: made once per shape for the whole module."""
    key = (E, H, I, dtype, device)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        _WEIGHTS[key] = make_weights(E, H, I, dtype, device, H + I + E)
    return _WEIGHTS[key]


def check_against_reference(kernels, x, route, w13, w2, what, regime="decode"):
    y = kernels.moe_experts(x, route, w13, w2, regime=regime)
    assert y.dtype == x.dtype and y.shape == x.shape, what
    # fp32 math on the same low-precision inputs
    ref32 = reference.moe_experts(x.float(), *route_args(route), w13, w2)
    low = eager_low(x, route, w13, w2)
    assert_2x_rule(y, ref32, low, what=what)
    return y


GPU_T = [1, 2, 3, 5, 8, 16, 33, 64]


# The emulator runs the decode GEMVs (regime "decode") at every T it is given; widths not multiples of the tiles.
EMU_HI = [(136, 200), (264, 72)]


@pytest.mark.parametrize("kern, case", backend_cases(
    [(T, H, I) for T in GPU_T for H, I in [(4096, 14336), (1024 + 64, 2816 + 32), (136, 200)]],
    [(T, H, I) for T in (1, 2, 5, 33, 64) for H, I in EMU_HI]), indirect=["kern"])
def test_kernel_matches_reference(kern, case):
    T, H, I = case
    E, k = 8, 2
    w13, w2 = cached_weights(E, H, I, torch.bfloat16, kern.device)
    route = routed(T, E, k, None, seed=T, device=kern.device)
    x = torch.randn(T, H, device=kern.device).bfloat16()
    check_against_reference(kern, x, route, w13, w2, f"T={T} H={H} I={I}")


@pytest.mark.parametrize("skew", ["one_expert", "all_on_two", "empty_expert"])
@pytest.mark.parametrize("kern, case", backend_cases(
    [(T, 1024 + 64, 2816 + 32) for T in (1, 3, 8, 33, 64, 150)], [(T, 136, 200) for T in (1, 3, 33)]),
    indirect=["kern"])
@pytest.mark.parametrize("E,k", [(8, 2), (16, 1)])
def test_kernel_skewed_routing(kern, skew, case, E, k):
    T, H, I = case
    w13, w2 = cached_weights(E, H, I, torch.bfloat16, kern.device)
    route = routed(T, E, k, skew, seed=T + E, device=kern.device)
    x = torch.randn(T, H, device=kern.device).bfloat16()
    check_against_reference(kern, x, route, w13, w2, f"{skew} T={T} E={E} k={k}")


GENERIC = [(1, 8, 2, 64, 96), (7, 4, 4, 8, 8), (20, 64, 2, 256, 512), (300, 8, 2, 256, 512), (2, 3, 3, 520, 72)]


@pytest.mark.parametrize("kern, case", backend_cases(GENERIC, [c for c in GENERIC if c[0] < 300]), indirect=["kern"])
def test_kernel_generic_shapes(kern, case):
    T, E, k, H, I = case
    w13, w2 = make_weights(E, H, I, torch.bfloat16, kern.device, T + E)
    route = ref_route(torch.randn(T, E, device=kern.device), k)
    x = torch.randn(T, H, device=kern.device).bfloat16()
    check_against_reference(kern, x, route, w13, w2, f"T={T} E={E} k={k} H={H} I={I}")


@pytest.mark.parametrize("kern, case", backend_cases([(T, 1024 + 64, 2816 + 32) for T in (1, 8, 40)],
                                                     [(T, 136, 200) for T in (1, 8)]), indirect=["kern"])
def test_kernel_fp16(kern, case):
    T, H, I = case
    E, k = 8, 2
    w13, w2 = make_weights(E, H, I, torch.float16, kern.device, 5)
    route = ref_route(torch.randn(T, E, device=kern.device), k)
    x = torch.randn(T, H, device=kern.device).half()
    check_against_reference(kern, x, route, w13, w2, f"fp16 T={T}")


@pytest.mark.parametrize("kern, case", backend_cases([(T, 1024 + 64, 2816 + 32) for T in (1, 8)],
                                                     [(T, 136, 200) for T in (1, 8)]), indirect=["kern"])
def test_kernel_reads_only_active_experts(kern, case):
    """The grid finds the active experts on the device: NaN in every other expert must not reach the output."""
    T, H, I = case
    E, k = 8, 2
    w13, w2 = make_weights(E, H, I, torch.bfloat16, kern.device, 9)
    route, inactive = active_only_route(T, E, k, kern.device)
    for e in inactive:
        w13[e] = float("nan")
        w2[e] = float("nan")
    x = torch.randn(T, H, device=kern.device).bfloat16()
    y = check_against_reference(kern, x, route, w13, w2, f"active-only T={T}")
    assert not torch.isnan(y).any()


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 8, 64, 100])
def test_kernel_deterministic(kernels, T):
    E, k, H, I = 8, 2, 4096, 14336
    w13, w2 = cached_weights(E, H, I, torch.bfloat16)
    route = routed(T, E, k, None, seed=100 + T)
    x = torch.randn(T, H, device="cuda").bfloat16()
    first = kernels.moe_experts(x, route, w13, w2)
    for _ in range(5):
        assert torch.equal(kernels.moe_experts(x, route, w13, w2), first), f"T={T}: output bits differ between runs"


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 8, 64])
def test_kernel_graph_capture(kernels, T):
    """Route + experts captured together (as in the decode step), replayed on new inputs, equal to eager."""
    E, k, H, I = 8, 2, 1024 + 64, 2816 + 32
    w13, w2 = cached_weights(E, H, I, torch.bfloat16)
    # Static inputs: the tokens and their router logits (no cuBLAS in the graph, so eager must match bit for bit).
    x = torch.randn(T, H, device="cuda").bfloat16()
    logits = torch.randn(T, E, device="cuda").bfloat16()

    def layer(inp, lg):
        return kernels.moe_experts(inp, kernels.moe_route(lg, k), w13, w2)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture, on a side stream as torch recommends
        layer(x, logits)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = layer(x, logits)
    fresh_x = torch.randn(T, H, device="cuda").bfloat16()
    fresh_logits = torch.randn(T, E, device="cuda").bfloat16()
    x.copy_(fresh_x)
    logits.copy_(fresh_logits)
    g.replay()
    eager = layer(fresh_x, fresh_logits)
    assert torch.equal(captured, eager), f"T={T}: graph replay differs from eager"
    route = ops.Route(*reference.moe_route(fresh_logits, k))
    assert_2x_rule(captured, reference.moe_experts(fresh_x.float(), *route_args(route), w13, w2),
                   eager_low(fresh_x, route, w13, w2), what=f"graph T={T}")


@pytest.mark.cuda
def test_kernel_opcheck_and_errors(kernels):
    assert kernels.has_cuda_kernel("moe_experts")
    T, E, k, H, I = 3, 8, 2, 64, 96
    w13, w2 = make_weights(E, H, I, torch.bfloat16, "cuda", 3)
    route = ref_route(torch.randn(T, E, device="cuda"), k)
    x = torch.randn(T, H, device="cuda").bfloat16()
    torch.library.opcheck(torch.ops.mixtral_ext.moe_experts.default, (x, *route_args(route), w13, w2))
    op = torch.ops.mixtral_ext.moe_experts
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        op(x.float(), *route_args(route), w13.float(), w2.float())
    with pytest.raises(RuntimeError, match="w2 must be"):
        op(x, *route_args(route), w13, w2[:, :, :-8].contiguous())
    with pytest.raises(RuntimeError, match="multiples of 8"):
        w13o, w2o = make_weights(E, 60, I, torch.bfloat16, "cuda", 4)
        op(torch.randn(T, 60, device="cuda").bfloat16(), *route_args(route), w13o, w2o)
    with pytest.raises(RuntimeError, match="expert_offsets"):
        op(x, route.topk_weights, route.topk_ids, route.expert_offsets[:-1], route.sorted_tokens, route.token_rows,
           w13, w2)
    with pytest.raises(RuntimeError, match="w13 must be"):
        op(x, *route_args(route), w13.float(), w2)
