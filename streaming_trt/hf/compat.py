"""Which transformers releases :mod:`streaming_trt.hf` runs on, checked before any hook is installed."""
from __future__ import annotations

import inspect

from ..contract import UserError
from ..runtime.versions import version_tuple

# [min, max): every architecture equals the oracle on both ends (5.24.0 and the newest 5.x, .ci/run).
# Before 5.24 models take their cache as `past_key_values` and Falcon / MPT call their attention with
# other arguments; 5.0.0 has no CacheLayerMixin.get_max_length: the hooks were never right there.
SUPPORTED_TRANSFORMERS = ((5, 24), (6, 0))


def check_transformers(version: str | None = None) -> None:
    """Raise UserError unless the installed transformers has the hooks this package relies on.

    Checks the version against :data:`SUPPORTED_TRANSFORMERS` and the presence of ``CacheLayerMixin``
    (with ``update / get_seq_length / get_mask_sizes / lazy_initialization / get_max_length``),
    ``Cache(layers=...)``, ``AttentionInterface.register`` and ``PreTrainedModel.set_attn_implementation``.
    """
    import transformers  # the [hf] extra, optional

    v = version or transformers.__version__
    lo, hi = SUPPORTED_TRANSFORMERS
    if not (lo <= (version_tuple(v, 2) or (0, 0)) < hi):
        raise UserError(
            f"streaming_trt.hf supports transformers >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} (its Cache, "
            f"AttentionInterface and rotary hooks were checked there); found {v}: "
            f"pip install 'transformers>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}'")
    missing = []
    try:
        from transformers.cache_utils import Cache, CacheLayerMixin  # the [hf] extra, optional

        for name in ("update", "get_seq_length", "get_mask_sizes", "lazy_initialization", "get_max_length"):
            if not hasattr(CacheLayerMixin, name):
                missing.append(f"CacheLayerMixin.{name}")
        if "layers" not in inspect.signature(Cache.__init__).parameters:
            missing.append("Cache(layers=...)")
    except ImportError:
        missing.append("transformers.cache_utils.CacheLayerMixin")
    try:
        from transformers import AttentionInterface  # the [hf] extra, optional

        if not hasattr(AttentionInterface, "register"):
            missing.append("AttentionInterface.register")
    except ImportError:
        missing.append("transformers.AttentionInterface")
    if not hasattr(transformers.PreTrainedModel, "set_attn_implementation"):
        missing.append("PreTrainedModel.set_attn_implementation")
    if missing:
        raise UserError(f"transformers {v} lacks the hooks streaming_trt.hf needs ({', '.join(missing)}); "
                        f"install a transformers {lo[0]}.x release")

