"""Version strings as comparable tuples (transformers for streaming_trt.hf, TensorRT-LLM for the export)."""
from __future__ import annotations

import re


def version_tuple(version: str | None, parts: int | None = None) -> tuple[int, ...] | None:
    """``"5.17.0.dev0+cu" -> (5, 17, 0)``: the leading dotted integers (a part's digits before any
    letter suffix, ``"0rc1" -> 0``), padded with zeros or cut to ``parts``; None when ``version``
    is None or starts with no number."""
    if version is None:
        return None
    nums = []
    for part in str(version).split("+")[0].split("."):
        m = re.match(r"\d+", part)
        if m is None:
            break
        nums.append(int(m.group()))
    if not nums:
        return None
    if parts is not None:
        nums = (nums + [0] * parts)[:parts]
    return tuple(nums)
