"""The CUDA extension: built, loadable, every op has a CUDA kernel, and static checks on the machine code (sm_80
and sm_90a present, no local-memory spills, tensor-core instructions where the kernels are meant to use them).

These run without a GPU. Where the extension was not built they skip, unless MIXTRAL_EXT_REQUIRE_BUILD=1 (CI sets it),
in which case they fail.
"""
import functools
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import mixtral_ext
from mixtral_ext import ops

REQUIRED = os.environ.get("MIXTRAL_EXT_REQUIRE_BUILD") == "1"


def _so():
    found = glob.glob(os.path.join(os.path.dirname(mixtral_ext.__file__), "_C*.so"))
    return found[0] if found else None


def _cuobjdump():
    here = os.path.join(os.path.dirname(torch.__file__), "..", "triton", "backends", "nvidia", "bin", "cuobjdump")
    for cand in (here, shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.fixture(scope="module")
def built():
    if not mixtral_ext.HAS_CUDA_KERNELS:
        if REQUIRED:
            pytest.fail(f"MIXTRAL_EXT_REQUIRE_BUILD=1 but the extension is unavailable: {mixtral_ext.EXTENSION_STATUS}")
        pytest.skip(f"CUDA extension not built: {mixtral_ext.EXTENSION_STATUS}")
    return _so()


@pytest.fixture(scope="module")
def cuobjdump(built):
    tool = _cuobjdump()
    if tool is None:
        if REQUIRED:
            pytest.fail("no cuobjdump (expected with triton or the CUDA toolkit)")
        pytest.skip("no cuobjdump available")
    return tool


@functools.lru_cache(maxsize=None)
def _run(tool, *args):
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def _functions(text):
    """Split cuobjdump output into {(arch, mangled function name): body}."""
    out, arch, name, body = {}, None, None, []
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*(?:Function|\.section \.text\.|\s*Function :)\s*:?\s*(\S+?):?\s*$", line)
        if m and ("Function" in line):
            if name:
                out[(arch, name)] = "\n".join(body)
            name, body = m.group(1).rstrip(":"), []
        elif name:
            body.append(line)
    if name:
        out[(arch, name)] = "\n".join(body)
    return out


def test_every_op_has_a_cuda_kernel(built):
    missing = [n for n in ops.OP_NAMES if n not in ops.REFERENCE_ONLY and not ops.has_cuda_kernel(n)]
    assert not missing, f"ops without a CUDA kernel registered by _C: {missing}"
    stale = [n for n in ops.REFERENCE_ONLY if ops.has_cuda_kernel(n)]
    assert not stale, f"ops.REFERENCE_ONLY lists ops that now have a CUDA kernel: {stale}"


def test_reference_serves_every_op(built):
    for n in ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mixtral_ext::{n}", "CompositeExplicitAutograd")


def test_both_architectures_present(cuobjdump, built):
    elfs = _run(cuobjdump, "--list-elf", built)
    archs = set(re.findall(r"\.(sm_\w+)\.cubin", elfs))
    wanted = {"sm_" + a for a in os.environ.get("MIXTRAL_EXT_ARCH", "80;90a").split(";")}
    assert wanted <= archs, f"built for {archs}, expected {wanted}"


def test_no_local_memory_spills(cuobjdump, built):
    usage = _functions(_run(cuobjdump, "--dump-resource-usage", built))
    assert usage, "no kernels found in the extension"
    bad = []
    for (arch, fn), body in usage.items():
        m = re.search(r"STACK:(\d+).*LOCAL:(\d+)", body)
        assert m, f"no resource line for {fn}"
        if int(m.group(1)) or int(m.group(2)):
            bad.append(f"{arch} {fn}: STACK {m.group(1)} LOCAL {m.group(2)}")
    assert not bad, "kernels using local memory (spills or dynamically indexed arrays):\n" + "\n".join(bad)


# Every kernel the ops launch, by its unmangled base name; each must be in every architecture's image.
KERNELS = ["rms_norm_kernel", "rope_kv_append_kernel", "attention_decode_kernel", "attention_decode_combine_kernel",
           "attention_prefill_sm80_kernel", "attention_prefill_sm90_kernel", "moe_route_single_kernel",
           "moe_route_count_kernel", "moe_route_scan_kernel", "moe_route_scatter_kernel", "moe_gemv_kernel",
           "moe_combine_kernel", "moe_gemm_sm80_kernel", "moe_gemm_sm90_kernel", "moe_gather_rows_kernel",
           "moe_dequant_kernel"]
TENSOR_CORE_SM80 = ["attention_prefill_sm80_kernel", "moe_gemm_sm80_kernel"]  # mma.sync: HMMA in every image
TENSOR_CORE_SM90 = ["attention_prefill_sm90_kernel", "moe_gemm_sm90_kernel"]  # wgmma: HGMMA in the sm_90a image


def _archs():
    return ["sm_" + a for a in os.environ.get("MIXTRAL_EXT_ARCH", "80;90a").split(";")]


def _sass_by_kernel(tool, so, arch):
    """{base kernel name: [SASS body of each instantiation]} for one architecture's image."""
    out = {}
    for (_, fn), body in _functions(_run(tool, "-sass", "-arch", arch, so)).items():
        base = next((k for k in sorted(KERNELS, key=len, reverse=True) if k in fn), fn)
        out.setdefault(base, []).append(body)
    return out


@pytest.mark.parametrize("arch", _archs())
def test_every_kernel_is_built(cuobjdump, built, arch):
    present = _sass_by_kernel(cuobjdump, built, arch)
    missing = [k for k in KERNELS if k not in present]
    assert not missing, f"kernels missing from the {arch} image: {missing}"


@pytest.mark.parametrize("arch", _archs())
def test_mma_sync_kernels_use_tensor_cores(cuobjdump, built, arch):
    sass = _sass_by_kernel(cuobjdump, built, arch)
    for k in TENSOR_CORE_SM80:
        assert sass.get(k) and all("HMMA" in body for body in sass[k]), f"{k} has no HMMA in its {arch} SASS"


def test_hopper_kernels_use_wgmma(cuobjdump, built):
    """The Hopper kernels must contain HGMMA in their sm_90a SASS (else they run on a slower path), and so must
    every other kernel named *sm90*."""
    if "sm_90a" not in _archs():
        pytest.skip("not built for sm_90a")
    sass = _functions(_run(cuobjdump, "-sass", "-arch", "sm_90a", built))
    hopper = {fn: body for (_, fn), body in sass.items() if "sm90" in fn}
    for k in TENSOR_CORE_SM90:
        assert any(k in fn for fn in hopper), f"{k} is missing from the sm_90a image"
    lacking = [fn for fn, body in hopper.items() if "HGMMA" not in body]
    assert not lacking, f"sm90 kernels without HGMMA: {lacking}"
