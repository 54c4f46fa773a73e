"""Compatibility path: :class:`Geometry` lives in :mod:`streaming_trt.contract`."""
from streaming_trt.contract import Geometry  # absolute: transformers may import this dir as a top-level "kernels"

__all__ = ["Geometry"]
