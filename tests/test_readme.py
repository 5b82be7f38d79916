"""The README's Python example runs as written on this machine (its checkpoint path swapped for a tiny random
checkpoint), whichever device is here; from_pretrained(device="cuda") without a GPU is one clear error."""
import contextlib
import io
import os
import re

import pytest
import torch

import mixtral_ext as mx
from mixtral_ext.demo import build_tiny_checkpoint

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_python_example_runs(tmp_path):
    with open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) == 1
    code = blocks[0]
    assert '"/path/to/Mixtral-8x7B-Instruct-v0.1"' in code
    build_tiny_checkpoint(tmp_path)
    code = code.replace('"/path/to/Mixtral-8x7B-Instruct-v0.1"', repr(str(tmp_path)))
    code = code.replace("max_new_tokens=64", "max_new_tokens=4")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().strip()  # four random words


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    build_tiny_checkpoint(tmp_path)
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(RuntimeError, match=r"device='cuda(:0)?': no CUDA GPU is available here .*Use "
                                               r"device='cpu'"):
            mx.Mixtral.from_pretrained(str(tmp_path), device=device, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU tests only skip on a machine without a GPU")
def test_skipped_gpu_tests_are_one_summary_line():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_rms_norm.py"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    lines = r.stdout.splitlines()
    skip_lines = [line for line in lines if "needs a CUDA GPU" in line]
    n = int(re.search(r"(\d+) skipped", lines[-1]).group(1))
    # Other skip reasons (e.g. no emulation build on a machine without a C++ compiler) get lines of their own.
    m = [re.fullmatch(r"(\d+) skipped: needs a CUDA GPU \(pytest -rs lists them\)", line) for line in skip_lines]
    assert r.returncode == 0 and len(m) == 1 and m[0] and 1 < int(m[0].group(1)) <= n, r.stdout
