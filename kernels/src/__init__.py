"""Attention over a sink + ring KV cache: Triton kernels and their PyTorch references.

This package knows nothing of models; see ``reference.py`` for the cache layout every function
here shares. ``reference`` imports without triton. The Triton versions of ``decode_attention``,
``prefill_attention`` and ``cache_write`` (same signatures and results as the references) load on
first use, so triton is only imported when a kernel is asked for.

Run the kernels on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow, for tests);
set that variable before the first kernel is imported.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import reference

__all__ = ["reference", "triton_available", "interpreting", "decode_attention", "prefill_attention", "cache_write"]

_KERNELS = {
    "decode_attention": "decode",
    "prefill_attention": "prefill",
    "cache_write": "write",
}


def triton_available() -> bool:
    """True when the Triton kernels can run here: triton is installed and either a CUDA GPU is
    visible or ``TRITON_INTERPRET=1`` (CPU interpreter) is set."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if interpreting():
        return True
    return torch.cuda.is_available()


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def __getattr__(name: str):
    if name in _KERNELS:
        module = importlib.import_module(f".{_KERNELS[name]}", __name__)
        fn = getattr(module, name)
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
