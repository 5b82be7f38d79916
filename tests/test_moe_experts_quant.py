"""moe_experts_quant kernels against the reference (dequantize, then float32 math) under the 2x rule, on the GPU and
emulated on the CPU (the `kern` fixture: the kernels' exact source, reduced shapes): the int8 / packed-int4 decode
GEMVs and the dequantize-then-grouped-GEMM prefill path; only active experts read; deterministic; graph capture;
argument errors. The CPU side (formats, reference, model) is tests/test_quant.py."""
import pytest
import torch

from conftest import backend_cases
from mixtral_ext import quant, reference
from numerics import assert_2x_rule
from moe_experts_inputs import active_only_route, eager_low, ref_route, route_args, routed

MODES = {"int8": 8, "int4": 4}
_WEIGHTS = {}


def quantized_weights(E, H, I, mode, seed=0, device="cuda"):
    """(q13, s13, q2, s2) quantized from random weights scaled so activations stay O(1); cached per shape
    (Mixtral's size is 1.4 G weights)."""
    key = (E, H, I, mode, seed, device)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        g = torch.Generator(device=device).manual_seed(seed + H + I)
        out = []
        for rows, cols in ((2 * I, H), (H, I)):
            w = torch.empty(E, rows, cols, device=device)
            for e in range(E):  # expert by expert: one fp32 expert at a time
                w[e] = torch.randn(rows, cols, device=device, generator=g) / cols ** 0.5
            out += quant.quantize(w, mode)
            del w
        _WEIGHTS[key] = tuple(out)
    return _WEIGHTS[key]


def check(kern, x, route, qw, mode, what, regime=None):
    q13, s13, q2, s2 = qw
    kw = {} if regime is None else {"regime": regime}
    y = kern.moe_experts_quant(x, route, q13, s13, q2, s2, MODES[mode], **kw)
    assert y.dtype == x.dtype and y.shape == x.shape, what
    ref32 = reference.moe_experts_quant(x.float(), *route_args(route), q13, s13, q2, s2, MODES[mode])
    # The baseline: the same math in the low dtype, on the dequantized weights rounded to it.
    low = eager_low(x, route, quant.dequantize(q13, s13).to(x.dtype), quant.dequantize(q2, s2).to(x.dtype))
    assert_2x_rule(y, ref32, low, what=what)
    return y


CUDA_ONLY = [pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("kern", CUDA_ONLY, indirect=True)
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 6, 7, 8, 16, 64, 100])
def test_kernel_matches_reference_mixtral_size(kern, mode, T):
    E, k, H, I = 8, 2, 4096, 14336
    qw = quantized_weights(E, H, I, mode)
    route = ref_route(torch.randn(T, E, device="cuda", generator=torch.Generator("cuda").manual_seed(T)), k)
    x = torch.randn(T, H, device="cuda").bfloat16()
    check(kern, x, route, qw, mode, f"{mode} T={T}")


# Emulated widths: int8 H and I multiples of 16 but not of the GEMV's 32-row block or its 512-element K stride
# (2I = 416 rows = 13 blocks; H = 144 rows = 4.5 blocks); int4 needs multiples of 128 (the group), 2I = 768 and
# H = 384 rows, K = 384 / 128 (3 / 1 groups, a K shorter than one warp's 32 x 32-weight stride).
EMU_QHI = {"int8": (144, 208), "int4": (384, 128)}


@pytest.mark.parametrize("kern, case", backend_cases(
    [(m, T) for m in sorted(MODES) for T in (1, 2, 3, 5, 8)],
    [(m, T) for m in sorted(MODES) for T in range(1, 9)]), indirect=["kern"])
def test_kernel_decode_small_t(kern, case):
    """The decode GEMVs at T = 1..8 (every chunk width 1, 2, 4, 8 and the rows left over)."""
    mode, T = case
    E, k = 8, 2
    H, I = EMU_QHI[mode] if kern.name == "emu" else (1040, 2832) if mode == "int8" else (1024, 2816)
    qw = quantized_weights(E, H, I, mode, seed=T, device=kern.device)
    route = ref_route(torch.randn(T, E, device=kern.device, generator=torch.Generator(kern.device).manual_seed(T)), k)
    x = torch.randn(T, H, device=kern.device).bfloat16()
    check(kern, x, route, qw, mode, f"{mode} T={T} H={H} I={I}", regime="decode")


@pytest.mark.parametrize("skew", ["one_expert", "all_on_two", "empty_expert"])
@pytest.mark.parametrize("kern, case", backend_cases(
    [(m, T) for m in sorted(MODES) for T in (1, 3, 8, 33)], [(m, T) for m in sorted(MODES) for T in (3, 8)]),
    indirect=["kern"])
def test_kernel_skewed_routing(kern, skew, case):
    """Experts with no tokens, every token on one expert (16 rows of one expert at T = 8, k = 2)."""
    mode, T = case
    E, k = 8, 2
    H, I = EMU_QHI[mode] if kern.name == "emu" else (1024, 2816)
    qw = quantized_weights(E, H, I, mode, seed=5, device=kern.device)
    route = routed(T, E, k, skew, seed=T + E, device=kern.device)
    x = torch.randn(T, H, device=kern.device).bfloat16()
    check(kern, x, route, qw, mode, f"{mode} {skew} T={T}", regime="decode")


@pytest.mark.parametrize("kern, case", backend_cases(
    [(m, T, dt) for m in sorted(MODES) for T in (1, 8) for dt in ("bf16", "fp16")],
    [(m, T, dt) for m in sorted(MODES) for T in (1, 8) for dt in ("bf16", "fp16")]), indirect=["kern"])
def test_kernel_dtypes_and_odd_experts(kern, case):
    """bf16 and fp16 activations; E = 3 experts with k = 3 (every expert active), and 1 expert (k = 1)."""
    mode, T, dt = case
    dtype = torch.bfloat16 if dt == "bf16" else torch.float16
    H, I = EMU_QHI[mode] if kern.name == "emu" else (1024, 2816)
    for E, k in ((3, 3), (1, 1)):
        qw = quantized_weights(E, H, I, mode, seed=E + T, device=kern.device)
        route = ref_route(torch.randn(T, E, device=kern.device), k)
        x = torch.randn(T, H, device=kern.device).to(dtype)
        check(kern, x, route, qw, mode, f"{mode} {dt} T={T} E={E} k={k}", regime="decode")


@pytest.mark.parametrize("kern, case", backend_cases(
    [(m, T) for m in sorted(MODES) for T in (65, 150)], [(m, T) for m in sorted(MODES) for T in (9, 65)]),
    indirect=["kern"])
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_kernel_prefill_dequantize(kern, case, dt):
    """The prefill regime: the dequantize kernel (q * scale rounded once to the activation dtype), then the grouped
    GEMM; an expert with no tokens among the routes."""
    mode, T = case
    dtype = torch.bfloat16 if dt == "bf16" else torch.float16
    E, k = 8, 2
    H, I = EMU_QHI[mode] if kern.name == "emu" else (1024, 2816)
    qw = quantized_weights(E, H, I, mode, seed=T, device=kern.device)
    route = routed(T, E, k, "empty_expert", seed=T, device=kern.device)
    x = torch.randn(T, H, device=kern.device).to(dtype)
    check(kern, x, route, qw, mode, f"prefill {mode} {dt} T={T}", regime="prefill")


@pytest.mark.parametrize("kern", CUDA_ONLY, indirect=True)
@pytest.mark.parametrize("mode,H,I", [("int8", 1040, 2832), ("int8", 16, 48), ("int4", 384, 640),
                                      ("int4", 128, 128), ("int4", 1024, 2816)])
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (5, 4, 4), (8, 64, 2), (150, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_awkward_shapes(kern, mode, H, I, T, E, k, dtype):
    qw = quantized_weights(E, H, I, mode, seed=T)
    route = ref_route(torch.randn(T, E, device="cuda"), k)
    x = torch.randn(T, H, device="cuda").to(dtype)
    check(kern, x, route, qw, mode, f"{mode} {dtype} T={T} E={E} k={k} H={H} I={I}")


@pytest.mark.parametrize("kern, case", backend_cases(
    [(m, T) for m in sorted(MODES) for T in (1, 8)], [(m, T) for m in sorted(MODES) for T in (1, 8)]),
    indirect=["kern"])
def test_kernel_reads_only_active_experts(kern, case):
    """NaN scales in every expert nobody picked must not reach the output."""
    mode, T = case
    E, k = 8, 2
    H, I = EMU_QHI[mode] if kern.name == "emu" else (1024, 2816)
    q13, s13, q2, s2 = (t.clone() for t in quantized_weights(E, H, I, mode, seed=9, device=kern.device))
    route, inactive = active_only_route(T, E, k, kern.device)
    for e in inactive:
        s13[e] = float("nan")
        s2[e] = float("nan")
    x = torch.randn(T, H, device=kern.device).bfloat16()
    y = check(kern, x, route, (q13, s13, q2, s2), mode, f"active-only {mode} T={T}", regime="decode")
    assert not torch.isnan(y).any()


@pytest.mark.cuda
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("T", [1, 8])
def test_kernel_deterministic_and_graph_capture(kernels, mode, T):
    E, k, H, I = 8, 2, 1024, 2816
    q13, s13, q2, s2 = quantized_weights(E, H, I, mode, seed=3)
    x = torch.randn(T, H, device="cuda").bfloat16()
    logits = torch.randn(T, E, device="cuda").bfloat16()

    def layer(inp, lg):
        return kernels.moe_experts(inp, kernels.moe_route(lg, k), q13, q2, s13, s2)

    first = layer(x, logits)
    for _ in range(3):
        assert torch.equal(layer(x, logits), first), f"{mode} T={T}: output bits differ between runs"
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(x, logits)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = layer(x, logits)
    fresh_x, fresh_logits = torch.randn_like(x), torch.randn_like(logits)
    x.copy_(fresh_x)
    logits.copy_(fresh_logits)
    g.replay()
    assert torch.equal(captured, layer(fresh_x, fresh_logits)), f"{mode} T={T}: graph replay differs from eager"


@pytest.mark.cuda
def test_kernel_opcheck_and_errors(kernels):
    assert kernels.has_cuda_kernel("moe_experts_quant")
    T, E, k, H, I = 3, 8, 2, 128, 256
    q13, s13, q2, s2 = quantized_weights(E, H, I, "int4", seed=1)
    route = ref_route(torch.randn(T, E, device="cuda"), k)
    x = torch.randn(T, H, device="cuda").bfloat16()
    op = torch.ops.mixtral_ext.moe_experts_quant
    torch.library.opcheck(op.default, (x, *route_args(route), q13, s13, q2, s2, 4))
    with pytest.raises(RuntimeError, match="bits must be 8"):
        op(x, *route_args(route), q13, s13, q2, s2, 2)
    with pytest.raises(RuntimeError, match="w13 must be"):
        op(x, *route_args(route), q13.view(torch.int8), s13, q2.view(torch.int8), s2, 8)
    with pytest.raises(RuntimeError, match="w13_scale must be"):
        op(x, *route_args(route), q13, s13[..., :1].contiguous(), q2, s2, 4)
    with pytest.raises(RuntimeError, match="multiples of 128"):
        op(torch.randn(T, 64, device="cuda").bfloat16(), *route_args(route), q13[..., :32].contiguous(),
           s13[..., :1].contiguous(), q2, s2, 4)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        op(x.float(), *route_args(route), q13, s13, q2, s2, 4)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", sorted(MODES))
def test_quantized_model_on_gpu_uses_graphs_and_matches_eager(mode, tmp_path):
    """A quantized bf16 model with Mixtral's head shapes: the decode step is captured (every op has a kernel) and
    greedy generation with graphs equals the eager steps."""
    from mixtral_ext.demo import build_tiny_checkpoint, demo_config
    from mixtral_ext.generate import graphs_supported
    from mixtral_ext.model import Mixtral

    build_tiny_checkpoint(tmp_path, demo_config("cuda"), seed=2, dtype=torch.bfloat16)
    model = Mixtral.from_pretrained(str(tmp_path), device="cuda", quantize=mode, progress=False)
    assert graphs_supported(model)
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142]], device="cuda")
    graphed = model.generate(ids, max_new_tokens=12, use_cuda_graph=True, eos_token_id=[])
    eager = model.generate(ids, max_new_tokens=12, use_cuda_graph=False, eos_token_id=[])
    assert torch.equal(graphed, eager)
