"""Compatibility path: the errors live in :mod:`streaming_trt.contract` (also ``streaming_trt.UserError``)."""
from .contract import CheckpointError, UnsupportedModelError, UserError

__all__ = ["UserError", "CheckpointError", "UnsupportedModelError"]
