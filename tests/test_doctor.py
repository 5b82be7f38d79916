"""`mixtral-ext doctor`: the environment lines, one line per op and kernel path with PASS / FAIL / SKIP, exit status
non-zero on any FAIL. On this CPU machine it runs the kernels through the emulator (skipped when the emulation
extension is not built, unless MIXTRAL_EXT_REQUIRE_BUILD=1)."""
import os
import subprocess
import sys

from mixtral_ext import cli, doctor, emu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_doctor_subprocess_passes_and_lists_paths(emu_built):
    r = subprocess.run([sys.executable, "-m", "mixtral_ext", "doctor", "--emu", "--only", "rms_norm", "--only",
                        "moe_route", "--only", "attention_decode"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for needle in ("torch", "CUDA extension (_C)", "emulation extension (_emu)", "loaded", "CPU emulator"):
        assert needle in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.rstrip().endswith(("PASS", "FAIL")) or "SKIP" in ln]
    paths = {(ln.split()[0], ln.split()[1]) for ln in lines}
    assert {("rms_norm", "plain"), ("rms_norm", "fused"), ("moe_route", "single"), ("moe_route", "count/scan/scatter"),
            ("attention_decode", "auto"), ("attention_decode", "3")} <= paths, r.stdout
    assert all(ln.rstrip().endswith("PASS") for ln in lines), r.stdout
    assert "6 passed, 0 failed" in r.stdout


def test_doctor_fails_when_a_kernel_disagrees_with_the_reference(emu_built, capsys, monkeypatch):
    """A wrong answer (the kernel's output moved by a quarter) is a FAIL line and exit 1."""
    real = emu.rms_norm

    def off(*a, **k):
        out, r = real(*a, **k)
        return out + 0.25, r

    monkeypatch.setattr(emu, "rms_norm", off)
    rc = cli.main(["doctor", "--emu", "--only", "rms_norm"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and "0 passed, 2 failed" in out


def test_doctor_emulator_report_is_a_fail(emu_built, capsys, monkeypatch):
    """An emulator report (race, deadlock, out-of-bounds...) raises RuntimeError: a FAIL line carrying its text."""

    def boom(*a, **k):
        raise RuntimeError("mixtral_ext.emu.rms_norm: shared-memory race between a.cu:1 and a.cu:2")

    monkeypatch.setattr(emu, "rms_norm", boom)
    rc = cli.main(["doctor", "--emu", "--only", "rms_norm"])
    out = capsys.readouterr().out
    assert rc == 1 and "shared-memory race" in out


def test_doctor_without_any_kernel(capsys, monkeypatch):
    monkeypatch.setattr(emu, "available", lambda: False)
    monkeypatch.setattr(emu, "status", lambda: "not built (test)")
    monkeypatch.setattr(doctor.torch.cuda, "is_available", lambda: False)
    rc = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 1 and "no kernel can run here" in out and "not built (test)" in out


def test_doctor_unknown_op(capsys):
    rc = cli.main(["doctor", "--only", "nope"])
    err = capsys.readouterr().err
    assert rc != 0 and "unknown op(s) nope" in err
