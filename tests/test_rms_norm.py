"""rms_norm: the reference against an independent float64 formula (CPU, CI) and the CUDA kernel against the
reference (GPU)."""
import pytest
import torch

from mixtral_ext import ops, reference
from conftest import backend_cases, backends
from numerics import assert_2x_rule

SHAPES = [(1, 1), (1, 4096), (3, 7), (5, 129), (17, 4096), (64, 4100), (2, 14336)]


def formula(x, w, eps):
    x64 = x.double()
    return x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.usefixtures("cpu_impl")
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_formula(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3 + 0.5
    w = torch.randn(shape[-1], generator=g)
    out, res = ops.rms_norm(x, w, 1e-5)
    assert res is x
    torch.testing.assert_close(out.double(), formula(x, w, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("cpu_impl")
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_fused_residual_is_in_place(shape):
    g = torch.Generator().manual_seed(7 + sum(shape))
    x, r = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w = torch.randn(shape[-1], generator=g)
    r0 = r.clone()
    out, new_r = ops.rms_norm(x, w, 1e-6, residual=r)
    assert new_r is r
    torch.testing.assert_close(r, r0 + x, rtol=0, atol=0)
    torch.testing.assert_close(out.double(), formula(r0 + x, w, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("cpu_impl")
def test_reference_bf16_rounds_like_transformers():
    """In bf16 the normalised value is rounded before the weight multiply (MixtralRMSNorm's cast)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 512, generator=g).bfloat16()
    w = torch.randn(512, generator=g).bfloat16()
    xf = x.float()
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    out, _ = ops.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_opcheck_cpu():
    x, w, r = torch.randn(4, 64), torch.randn(64), torch.randn(4, 64)
    torch.library.opcheck(torch.ops.mixtral_ext.rms_norm.default, (x, w, 1e-5, None))
    torch.library.opcheck(torch.ops.mixtral_ext.rms_norm.default, (x, w, 1e-5, r))


def test_registered_for_all_devices():
    assert hasattr(torch.ops.mixtral_ext, "rms_norm")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mixtral_ext::rms_norm", "CompositeExplicitAutograd")


# ---- the kernel: on the GPU, and its source emulated on the CPU ---------------------------------------------------

# The emulator runs every thread on the CPU: the shapes that exercise the code paths (1 row, odd and sub-vector
# widths for the scalar path, the vector path with several strided passes), not the large ones.
EMU_SHAPES = [(1, 1), (3, 7), (5, 129), (17, 4096), (2, 4100)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kern, shape", backend_cases(SHAPES + [(4096, 4096), (3, 4097)], EMU_SHAPES),
                         indirect=["kern"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_kernel_matches_reference(kern, dtype, shape, with_residual):
    torch.manual_seed(shape[0] * 131 + shape[1])
    x = (torch.randn(shape, device=kern.device) * 2 + 0.3).to(dtype)
    w = torch.randn(shape[-1], device=kern.device).to(dtype)
    r = torch.randn(shape, device=kern.device).to(dtype) if with_residual else None
    r_ref = r.clone() if with_residual else None
    r_low = r.clone() if with_residual else None
    out, _ = kern.rms_norm(x, w, 1e-5, residual=r)
    low = reference.rms_norm(x, w, 1e-5, residual=r_low)
    ref32 = reference.rms_norm(x.float(), w.float(), 1e-5, residual=None if r_ref is None else r_ref.float())
    assert out.dtype == dtype and out.shape == x.shape
    if with_residual:
        assert torch.equal(r, r_low), "fused residual add must equal the rounded x + residual exactly"
    assert_2x_rule(out, ref32, low, what=f"rms_norm {dtype} {shape}")


@pytest.mark.parametrize("kern", backends(), indirect=True)
def test_kernel_strided_rows_and_determinism(kern):
    base = torch.randn(33, 3 * 1024, device=kern.device, dtype=torch.bfloat16)
    x = base[:, 1024:2048]  # rows strided by 3072: a view of a fused projection
    w = torch.randn(1024, device=kern.device, dtype=torch.bfloat16)
    first, _ = kern.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(first, reference.rms_norm(x.contiguous(), w, 1e-5), rtol=0.02, atol=0.02)
    for _ in range(4 if kern.name == "cuda" else 1):
        assert torch.equal(kern.rms_norm(x, w, 1e-5)[0], first)


@pytest.mark.cuda
def test_kernel_graph_capture(kernels):
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    r_eager = r.clone()
    eager, _ = kernels.rms_norm(x, w, 1e-5, residual=r_eager)
    g = torch.cuda.CUDAGraph()
    r_graph = r.clone()
    with torch.cuda.graph(g):
        out, _ = kernels.rms_norm(x, w, 1e-5, residual=r_graph)
    r_graph.copy_(r)
    g.replay()
    assert torch.equal(out, eager) and torch.equal(r_graph, r_eager)


@pytest.mark.cuda
def test_kernel_opcheck_and_errors(kernels):
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    assert kernels.has_cuda_kernel("rms_norm")
    torch.library.opcheck(torch.ops.mixtral_ext.rms_norm.default, (x, w, 1e-5, r))
    with pytest.raises(RuntimeError, match="weight has 255 elements"):
        torch.ops.mixtral_ext.rms_norm(x, w[:255], 1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.mixtral_ext.rms_norm(x, w.float(), 1e-5)
