"""Which implementation of the cache's attention kernels a model uses: the PyTorch references or
the Triton kernels, behind one interface.

Both provide ``cache_write``, ``decode_attention`` and ``prefill_attention`` with the signatures
of :mod:`streaming_trt.kernels.reference`.
"""
from __future__ import annotations

import importlib.util
from types import ModuleType

import torch

from .. import kernels
from ..contract import UserError

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` means Triton on CUDA when it is installed, PyTorch otherwise."""
    if backend not in BACKENDS:
        raise UserError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and kernels.triton_available() else "torch"
    if backend == "triton" and not kernels.triton_available():
        if importlib.util.find_spec("triton") is None:
            raise UserError("backend 'triton' needs the triton package: pip install 'streaming-trt[triton]'")
        raise UserError("backend 'triton' runs on CUDA devices (or on CPU with TRITON_INTERPRET=1); use --backend torch")
    if backend == "triton" and device.type != "cuda" and not kernels.interpreting():
        raise UserError("backend 'triton' on a CPU needs TRITON_INTERPRET=1 (slow, for tests); use --backend torch")
    return backend


def kernel_ops(backend: str) -> ModuleType:
    """The module whose functions implement attention for a resolved backend name."""
    return kernels.reference if backend == "torch" else kernels
