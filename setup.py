"""Build driver: CMake (CMakeLists.txt) is the one build definition; this file only decides what it builds.

The CUDA extension `mixtral_ext/_C*.so` is built when a CUDA toolkit is found and the installed torch is a
CUDA build, unless MIXTRAL_EXT_CUDA=0. Whether a GPU is present is never consulted. The emulation extension
`mixtral_ext/_emu*.so` (the same kernel sources run on the CPU, for tests and `doctor`) is built whenever a C++
compiler is found, CUDA toolkit or not, unless MIXTRAL_EXT_EMU=0. Knobs:
  MIXTRAL_EXT_CUDA=0|1     0: no CUDA extension; 1: the build is required (fail instead of skipping)
  MIXTRAL_EXT_EMU=0|1      0: no emulation extension; 1: required
  MIXTRAL_EXT_ARCH="80;90a" CUDA architectures (sm_80 and sm_90a by default)
  MAX_JOBS=N               parallel compile jobs (default: all cores)
  CUDA_HOME                toolkit root (default: /usr/local/cuda, else nvcc on PATH)
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += ["/usr/local/cuda/bin/nvcc", shutil.which("nvcc") or ""]
    found = next((c for c in candidates if c and os.path.exists(c)), None)
    return os.path.realpath(found) if found else None


def _cuda_build_wanted():
    """(build?, reason) from the env var, the toolkit and torch's build, never from a GPU."""
    flag = os.environ.get("MIXTRAL_EXT_CUDA", "auto").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False, "MIXTRAL_EXT_CUDA=0"
    required = flag in ("1", "on", "true", "yes")
    try:
        import torch
    except ImportError:
        reason = "torch is not importable at build time (install torch first, build with --no-build-isolation)"
        if required:
            raise RuntimeError(reason)
        return False, reason
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif _find_nvcc() is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    else:
        return True, ""
    if required:
        raise RuntimeError(f"MIXTRAL_EXT_CUDA=1 but {reason}")
    return False, reason


def _emu_build_wanted():
    """(build?, reason): the emulation extension needs torch at build time and a C++ compiler, nothing else."""
    flag = os.environ.get("MIXTRAL_EXT_EMU", "auto").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False, "MIXTRAL_EXT_EMU=0"
    required = flag in ("1", "on", "true", "yes")
    reason = ""
    try:
        import torch  # noqa: F401
    except ImportError:
        reason = "torch is not importable at build time"
    if not reason and not sys.platform.startswith("linux"):
        reason = f"the emulation runtime supports Linux only, not {sys.platform}"
    if not reason and not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        reason = "no C++ compiler found (set CXX)"
    if not reason and not shutil.which("cmake") and not os.path.exists(os.path.join(os.path.dirname(sys.executable),
                                                                                      "cmake")):
        reason = "no cmake found"
    if reason and required:
        raise RuntimeError(f"MIXTRAL_EXT_EMU=1 but {reason}")
    return not reason, reason


class CMakeBuild(build_ext):
    """One CMake configure + build for every extension requested (the first build_extension call does it)."""

    def build_extension(self, ext):
        import torch

        outputs = {e.name: os.path.abspath(self.get_ext_fullpath(e.name)) for e in self.extensions}
        if not getattr(self, "_cmake_done", False):
            self._cmake_done = True
            build_dir = os.path.abspath(os.environ.get("MIXTRAL_EXT_BUILD_DIR", "build"))
            os.makedirs(build_dir, exist_ok=True)
            with_cuda = "mixtral_ext._C" in outputs
            cfg = [
                "cmake", "-S", os.path.dirname(os.path.abspath(__file__)), "-B", build_dir, "-G", "Ninja",
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-DMIXTRAL_EXT_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
                f"-DMIXTRAL_EXT_WITH_EMU={'ON' if 'mixtral_ext._emu' in outputs else 'OFF'}",
                # CMake >= 4 (the pip wheel) refuses old policy minimums some dependency configs still declare.
                "-DCMAKE_POLICY_VERSION_MINIMUM=3.5",
            ]
            if with_cuda:
                nvcc = _find_nvcc()
                cfg += [
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                    f"-DCMAKE_CUDA_COMPILER={nvcc}",
                    # torch's CMake config locates cudart and the headers through FindCUDA's root, not the compiler.
                    f"-DCUDA_TOOLKIT_ROOT_DIR={os.path.dirname(os.path.dirname(nvcc))}",
                    f"-DMIXTRAL_EXT_ARCH={os.environ.get('MIXTRAL_EXT_ARCH', '80;90a')}",
                    f"-DMIXTRAL_EXT_OUTPUT={outputs['mixtral_ext._C']}",
                ]
            if "mixtral_ext._emu" in outputs:
                cfg.append(f"-DMIXTRAL_EXT_EMU_OUTPUT={outputs['mixtral_ext._emu']}")
            jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
            # Prefer the cmake/ninja installed next to this interpreter (a venv) over the system ones.
            os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
            subprocess.check_call(cfg)
            subprocess.check_call(["cmake", "--build", build_dir, "-j", jobs])
        if not os.path.exists(outputs[ext.name]):
            raise RuntimeError(f"CMake finished but {outputs[ext.name]} was not produced")


want, why = _cuda_build_wanted()
if not want:
    print(f"mixtral_ext: building without the CUDA extension ({why}); every op runs through the PyTorch reference")
want_emu, why_emu = _emu_build_wanted()
if not want_emu:
    print(f"mixtral_ext: building without the emulation extension ({why_emu}); mixtral_ext.emu is unavailable")
ext_modules = ([Extension("mixtral_ext._C", sources=[])] if want else []) + \
              ([Extension("mixtral_ext._emu", sources=[])] if want_emu else [])
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild} if ext_modules else {},
)
