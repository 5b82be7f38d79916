"""The kernels' exact CUDA source, run on the CPU by the emulation runtime (csrc/emu/, built into `_emu*.so`).

A test and debugging tool, not an inference path (that stays the references): each op takes CPU tensors and runs
one chosen kernel path; a bug the emulator detects (a shared-memory race, a deadlock, a global out-of-bounds access,
a warp collective with a lane missing) raises RuntimeError with a report naming the source lines.

    from mixtral_ext import emu
    if emu.available():
        emu.selftest("shfl", [x, sums, scan, bcast, down])
        emu.stats()            # per launch: kernel, grid, block, global bytes read / written (per buffer too)
"""
import functools
import glob
import json
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def _load():
    """(loaded?, reason): loads _emu*.so into torch.ops.mixtral_emu once."""
    # MIXTRAL_EXT_EMU_LIBRARY: another build of the library (bench/planted_bugs.py loads its mutants this way).
    override = os.environ.get("MIXTRAL_EXT_EMU_LIBRARY")
    found = [override] if override else sorted(glob.glob(os.path.join(_HERE, "_emu*.so")))
    if not found:
        return False, "the emulation extension (_emu*.so) was not built: no C++ compiler at install time, " \
                      "or MIXTRAL_EXT_EMU=0"
    try:
        torch.ops.load_library(found[0])
    except OSError as e:  # a stale build against another torch
        return False, f"cannot load {os.path.basename(found[0])}: {e}"
    return True, ""


def available():
    """True when the emulation extension is built and loads."""
    return _load()[0]


def status():
    """'' when available, else why not."""
    return _load()[1]


def _ops():
    ok, why = _load()
    if not ok:
        raise RuntimeError(f"mixtral_ext.emu: {why}")
    return torch.ops.mixtral_emu


def selftest(name, bufs, arg=0):
    """Run the runtime's own known-answer kernel `name` (csrc/emu/selftest.cu) on CPU tensors `bufs` (in place)."""
    _ops().selftest(name, list(bufs), int(arg))


def stats():
    """One dict per launch since reset_stats(): kernel, grid, block, smem, bytes_read, bytes_written, buffers
    ({name: [read, written, unique_read]} in bytes: every access counts in read / written, each byte once in
    unique_read)."""
    return json.loads(_ops().stats())


def reset_stats():
    _ops().reset_stats()


# ---- the ops: the signatures of mixtral_ext.ops, CPU tensors, plus the kernel path ---------------------------------
# arch: 80 or 90, the architecture the launchers see (device attributes; attention_prefill's path).

def rms_norm(x, weight, eps, residual=None, arch=80):
    """Returns (normed, new_residual) like ops.rms_norm; residual (if given) is updated in place."""
    out = _ops().rms_norm(x, weight, float(eps), residual, int(arch))
    return out, (x if residual is None else residual)


def rope_kv_append(qkv, positions, seq_ids, cos_sin, k_cache, v_cache, arch=80):
    return _ops().rope_kv_append(qkv, positions, seq_ids, cos_sin, k_cache, v_cache, int(arch))


def attention_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, max_seqlen_q, scale, window=0, arch=80):
    """arch 80: the mma.sync kernel; 90: the wgmma kernel."""
    return _ops().attention_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, int(max_seqlen_q), float(scale),
                                    int(window or 0), int(arch))


def attention_decode(q, k_cache, v_cache, seq_lens, scale, window=0, splits=0, arch=80):
    """splits: forced split-KV count (0: the launcher's choice for the arch's SM count)."""
    return _ops().attention_decode(q, k_cache, v_cache, seq_lens, float(scale), int(window or 0), int(splits),
                                   int(arch))


def moe_route(router_logits, top_k=2, path="auto", arch=80):
    """path: 'single' (one launch) or 'multi' (count, scan, scatter) asserts which one the launcher ran; 'auto'."""
    from .ops import Route

    return Route(*_ops().moe_route(router_logits, int(top_k), str(path), int(arch)))


def moe_experts(x, route, w13, w2, regime="decode", arch=80):
    """regime: 'decode' (the GEMVs) or 'prefill' (the grouped GEMM: on arch 90 the sm90 path where it can run, else
    sm80; an error if neither can run the shape)."""
    return _ops().moe_experts(x, route.topk_weights, route.topk_ids, route.expert_offsets, route.sorted_tokens,
                              route.token_rows, w13, w2, str(regime), int(arch))


def moe_experts_quant(x, route, w13, w13_scale, w2, w2_scale, bits, regime="decode", arch=80):
    """Quantized experts (bits 8: int8, 4: packed int4; formats in quant.py). regime: 'decode' (the GEMVs on the
    quantized bytes) or 'prefill' (the dequantize kernel, then the arch's grouped GEMM)."""
    return _ops().moe_experts_quant(x, route.topk_weights, route.topk_ids, route.expert_offsets, route.sorted_tokens,
                                    route.token_rows, w13, w13_scale, w2, w2_scale, int(bits), str(regime), int(arch))


# ---- the Hopper part (csrc/emu/sm90*.cpp) ---------------------------------------------------------------------------

def sm90_selftest(name, bufs, args=()):
    """Run the sm_90 known-answer kernel `name` (csrc/emu/sm90_selftest.cu) on contiguous CPU tensors `bufs` (in
    place); args: ints (args[0] picks a deliberately broken variant, args[1] = 1 for fp16)."""
    _ops().sm90_selftest(name, list(bufs), [int(a) for a in args])


def set_num_regs(regs, kernel=""):
    """The numRegs cudaFuncGetAttributes reports in emulation: for every kernel (kernel="", also forgetting the
    per-kernel values), or for the kernels whose name contains `kernel`. The sm_90a launchers check it (setmaxnreg
    budgets); the default is 168."""
    _ops().set_num_regs(int(regs), str(kernel))
