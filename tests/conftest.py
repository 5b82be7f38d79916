import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """`cuda` tests need a GPU; without one they are skipped (and reported as skipped, never as passed)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernels():
    """For `cuda` tests of our kernels: fails (not skips) when the extension is missing, so a GPU run can't pass
    by silently testing the reference against itself."""
    import mixtral_ext

    assert mixtral_ext.HAS_CUDA_KERNELS, f"CUDA extension unavailable: {mixtral_ext.EXTENSION_STATUS}"
    return mixtral_ext.ops


def pytest_terminal_summary(terminalreporter):
    """One line per skip reason with its count (e.g. the GPU tests on a CPU machine), instead of a line per test."""
    reasons = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons and "s" not in (terminalreporter.config.option.reportchars or ""):
        terminalreporter.write_sep("-", "skipped")
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{n} skipped: {reason} (pytest -rs lists them)")
