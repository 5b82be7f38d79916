"""mixtral_ext: Mixtral-8x7B inference with hand-written CUDA kernels, and a pure-PyTorch reference path."""
from . import ops
from .ops import EXTENSION_STATUS, HAS_CUDA_KERNELS

__version__ = "0.1.0"
__all__ = ["ops", "HAS_CUDA_KERNELS", "EXTENSION_STATUS", "__version__"]
