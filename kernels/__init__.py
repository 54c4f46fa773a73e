"""Attention over a sink + ring KV cache: Triton kernels and their PyTorch references.

This package knows nothing of models; see ``reference.py`` for the cache layout every function
here shares.
"""
from . import reference

__all__ = ["reference"]
