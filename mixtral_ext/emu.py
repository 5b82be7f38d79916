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
    found = sorted(glob.glob(os.path.join(_HERE, "_emu*.so")))
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
    ({name: [read, written]} in bytes)."""
    return json.loads(_ops().stats())


def reset_stats():
    _ops().reset_stats()
