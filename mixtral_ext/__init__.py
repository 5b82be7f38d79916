"""mixtral_ext: Mixtral-8x7B inference with hand-written CUDA kernels, and a pure-PyTorch reference path.

    import mixtral_ext as mx
    model = mx.Mixtral.from_pretrained(path, device="cuda" if torch.cuda.is_available() else "cpu")
    tok = mx.Tokenizer.from_pretrained(path)
"""
import importlib

from . import ops
from .ops import EXTENSION_STATUS, HAS_CUDA_KERNELS

__version__ = "0.1.0"

# Public names resolved on first use, so `import mixtral_ext` stays cheap (a service imports it at start-up).
_LAZY = {"Mixtral": "model", "MixtralConfig": "config", "Tokenizer": "tokenizer"}
__all__ = ["ops", "HAS_CUDA_KERNELS", "EXTENSION_STATUS", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mixtral_ext' has no attribute {name!r}")
