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
