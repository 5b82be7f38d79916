"""The CUDA extension: built, loadable, every op has a CUDA kernel, and every static check on the machine code (the
one place tests read cuobjdump output): sm_80 and sm_90a present, every kernel in every image with its expected
number of instantiations, no local-memory spills, the instructions each tensor-core kernel is built around (HMMA,
ldmatrix and cp.async in the sm_80 paths; HGMMA, TMA, setmaxnreg and mbarriers in the sm_90a ones), and register
counts that let setmaxnreg rebalance.

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
    """Split cuobjdump output (-sass, or -res-usage / --dump-resource-usage) into {(arch, mangled function name):
    body}: the SASS listing, or the resource line (REG:.. STACK:.. SHARED:.. LOCAL:..). A body ends at the next
    function or the next image's `arch =` line."""
    out, arch, key = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch, key = m.group(1), None
            continue
        m = re.match(r"\s*Function\s*:?\s*(\S+?):?\s*$", line)
        if m:
            key = (arch, m.group(1))
            out[key] = []
        elif key:
            out[key].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _kernel(mangled):
    """A function's own name from its Itanium-mangled symbol, without the enclosing namespaces (nvcc names an
    anonymous namespace after the source file) or the template arguments:
    _ZN7mixtral12_GLOBAL__N_115rms_norm_kernelILi0EEEvNS_13RmsNormParamsE -> rms_norm_kernel."""
    if not mangled.startswith("_Z"):
        return mangled
    nested = mangled.startswith("_ZN")
    i, name = 3 if nested else 2, mangled
    while i < len(mangled):
        if mangled[i] == "L":  # internal linkage
            i += 1
            continue
        m = re.match(r"\d+", mangled[i:])
        if not m:
            break
        i += len(m.group())
        name = mangled[i:i + int(m.group())]
        i += int(m.group())
        if not nested:
            break
    return name


def _by_kernel(functions):
    """{(arch, kernel name): [body of each instantiation]} from _functions' output."""
    out = {}
    for (arch, fn), body in functions.items():
        out.setdefault((arch, _kernel(fn)), []).append(body)
    return out


def _archs():
    return ["sm_" + a for a in os.environ.get("MIXTRAL_EXT_ARCH", "80;90a").split(";")]


@pytest.fixture(scope="module")
def sass(cuobjdump, built):
    """{(arch, kernel name): [SASS of each instantiation]} of the whole extension."""
    return _by_kernel(_functions(_run(cuobjdump, "-sass", built)))


@pytest.fixture(scope="module")
def resources(cuobjdump, built):
    """{(arch, kernel name): [resource line of each instantiation]} of the whole extension."""
    return _by_kernel(_functions(_run(cuobjdump, "--dump-resource-usage", built)))


def test_kernel_name_parser():
    assert _kernel("_ZN7mixtral12_GLOBAL__N_115rms_norm_kernelILi0EEEvNS_13RmsNormParamsE") == "rms_norm_kernel"
    k = "moe_experts_gather_rows_kernel"
    assert _kernel("_ZN7mixtral11moe_experts30moe_experts_gather_rows_kernelEPK5uint4PKiPS2_li") == k
    assert _kernel("_ZN7mixtral11moe_experts43_GLOBAL__N__1a2b3c4d_19_moe_experts_sm90_cu30moe_experts_gather_rows_"
                   "kernelEv") == k
    assert _kernel("_Z12plain_kernelPf") == "plain_kernel"
    assert _kernel("_ZL13static_kernelv") == "static_kernel"


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
    assert set(_archs()) <= archs, f"built for {archs}, expected {set(_archs())}"


def test_no_local_memory_spills(resources):
    assert resources, "no kernels found in the extension"
    bad = []
    for (arch, k), lines in resources.items():
        for line in lines:
            m = re.search(r"STACK:(\d+).*LOCAL:(\d+)", line)
            assert m, f"no resource line for {k}"
            if int(m.group(1)) or int(m.group(2)):
                bad.append(f"{arch} {k}: STACK {m.group(1)} LOCAL {m.group(2)}")
    assert not bad, "kernels using local memory (spills or dynamically indexed arrays):\n" + "\n".join(bad)


# Every kernel the ops launch, by its own (unqualified) name, with its number of instantiations (template arguments)
# where more than one: each must be in every architecture's image, and nothing else may be.
KERNELS = {"rms_norm_kernel": None, "rope_kv_append_kernel": None, "attention_decode_kernel": None,
           "attention_decode_combine_kernel": None, "attention_prefill_sm80_kernel": None,
           "attention_prefill_sm90_kernel": None, "moe_route_single_kernel": None, "moe_route_count_kernel": None,
           "moe_route_scan_kernel": None, "moe_route_scatter_kernel": None,
           "moe_experts_gemv_kernel": 60,  # 2 dtypes x 3 weight formats (dense, int8, int4) x 2 epilogues x 5 chunks
           "moe_experts_combine_kernel": 2,  # 2 dtypes
           "moe_experts_sm80_kernel": None, "moe_experts_sm90_kernel": None,
           "moe_experts_gather_rows_kernel": None,
           "moe_experts_dequant_kernel": None}
# The instructions every instantiation of a kernel must hold in its SASS, in every image: the mma.sync paths are
# built around HMMA fed by ldmatrix (LDSM) from tiles cp.async (LDGSTS) loaded.
SASS_ALL_ARCHS = {"attention_prefill_sm80_kernel": ("HMMA", "LDSM", "LDGSTS"),
                  "moe_experts_sm80_kernel": ("HMMA", "LDSM", "LDGSTS")}
# The same in the sm_90a image, where every kernel named *sm90* is a wgmma (HGMMA) kernel, else it runs on a slower
# path; both rebalance registers between their warpgroups (USETMAXREG) and wait on mbarriers (SYNCS), and the
# grouped GEMM loads through TMA (UTMALDG).
SASS_SM90A = {"attention_prefill_sm90_kernel": ("HGMMA", "USETMAXREG", "SYNCS"),
              "moe_experts_sm90_kernel": ("HGMMA", "UTMALDG", "USETMAXREG", "SYNCS")}


@pytest.mark.parametrize("arch", _archs())
def test_every_kernel_is_built(sass, arch):
    present = {k: len(bodies) for (a, k), bodies in sass.items() if a == arch}
    missing = [k for k in KERNELS if k not in present]
    assert not missing, f"kernels missing from the {arch} image: {missing}"
    unknown = [k for k in present if k not in KERNELS]
    assert not unknown, f"kernels in the {arch} image that KERNELS does not list: {unknown}"
    counts = {k: (present[k], n) for k, n in KERNELS.items() if n is not None and present[k] != n}
    assert not counts, f"{arch}: (instantiations, expected) of {counts}"


@pytest.mark.parametrize("arch", _archs())
def test_tensor_core_kernels_hold_their_instructions(sass, arch):
    wanted = {**SASS_ALL_ARCHS, **(SASS_SM90A if arch == "sm_90a" else {})}
    for k, instructions in wanted.items():
        bodies = sass.get((arch, k))
        assert bodies, f"{k} is missing from the {arch} image"
        lacking = {op for body in bodies for op in instructions if op not in body}
        assert not lacking, f"{k}: no {sorted(lacking)} in its {arch} SASS"


def test_hopper_kernels_use_wgmma(sass):
    """Every kernel whose own name says sm90 holds HGMMA in its sm_90a SASS (the file or namespace it sits in does
    not count: moe_experts_gather_rows_kernel lives in the sm90 grouped GEMM's file and is a plain copy)."""
    if "sm_90a" not in _archs():
        pytest.skip("not built for sm_90a")
    hopper = {k: bodies for (a, k), bodies in sass.items() if a == "sm_90a" and "sm90" in k}
    assert set(SASS_SM90A) <= set(hopper), f"sm90 kernels in the sm_90a image: {sorted(hopper)}"
    lacking = [k for k, bodies in hopper.items() if not all("HGMMA" in body for body in bodies)]
    assert not lacking, f"sm90 kernels without HGMMA: {lacking}"


def test_sm90_register_count_lets_setmaxnreg_rebalance(cuobjdump, built):
    """In a kernel that rebalances registers with setmaxnreg (one producer warpgroup, two consumer warpgroups: both
    sm90 kernels, see kProducerRegs / kConsumerRegs), the producer's decrease must free what the consumers' increase
    takes, else the increase waits forever: with R registers per thread at launch, 128 (R - dec) >= 256 (inc - R).
    The launchers decline such a build at run time (regs_ok); this catches it at build time. dec and inc are read
    from each instantiation's SASS (USETMAXREG.DEALLOC / .TRY_ALLOC), R from its resource usage."""
    if "sm_90a" not in _archs():
        pytest.skip("not built for sm_90a")
    sass = _functions(_run(cuobjdump, "-sass", "-arch", "sm_90a", built))
    usage = _functions(_run(cuobjdump, "--dump-resource-usage", "-arch", "sm_90a", built))
    checked, bad = set(), {}
    for (arch, fn), body in sass.items():
        if "USETMAXREG" not in body:
            continue
        dec = re.findall(r"USETMAXREG\.DEALLOC\S*\s+(0x[0-9a-f]+|\d+)", body)
        inc = re.findall(r"USETMAXREG\.TRY_ALLOC\S*\s+(?:U?P\d+,\s*)?(0x[0-9a-f]+|\d+)", body)
        assert dec and inc, f"{fn}: setmaxnreg without a readable DEALLOC and TRY_ALLOC target"
        dec, inc = max(int(v, 0) for v in dec), min(int(v, 0) for v in inc)
        regs = int(re.search(r"REG:(\d+)", usage[(arch, fn)]).group(1))
        checked.add(_kernel(fn))
        if 128 * (regs - dec) < 256 * (inc - regs):
            bad[fn] = (regs, dec, inc)
    assert set(SASS_SM90A) <= checked, f"kernels with setmaxnreg: {sorted(checked)}"
    assert not bad, f"(launch registers, dec, inc) that setmaxnreg cannot rebalance: {bad}"
