"""The error rule every float kernel is held to (DESIGN.md "Tests").

A kernel's error against a float32 reference may be at most 2x the error of the same math done in the low dtype by
eager PyTorch, plus rounding noise (a couple of output ulps at the reference's magnitude): a kernel that rounds
less than eager PyTorch passes easily, one that loses precision (a bf16 accumulator, a wrong max) fails.
"""
import torch

_EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -23}


def assert_2x_rule(out, ref_fp32, eager_low, what=""):
    """out: the kernel's output; ref_fp32: the float32 reference; eager_low: the same math in the low dtype."""
    assert not torch.isnan(out).any(), f"{what}: NaN in the kernel output"
    ref = ref_fp32.float()
    err = (out.float() - ref).abs().max().item()
    base = (eager_low.float() - ref).abs().max().item()
    noise = 2 * _EPS.get(out.dtype, 2.0 ** -8) * ref.abs().max().item()
    assert err <= 2 * base + noise, f"{what}: max error {err:.3e} > 2 x eager {base:.3e} + noise {noise:.3e}"
