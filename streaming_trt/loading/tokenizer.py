"""Tokenizers: a checkpoint's own (through transformers) or the built-in one that needs no download.

The runtime uses only ``encode``, ``decode``, ``apply_chat_template`` and ``eos_token_id``.
"""
from __future__ import annotations

from pathlib import Path

from .builtin import SMOLLM2_NAME, BuiltinTokenizer, require_smollm2
from ..contract import CheckpointError
from .gguf import is_gguf, load_gguf_tokenizer


def load_tokenizer(path: str | Path | None):
    """The tokenizer of checkpoint directory ``path`` (via transformers), of a ``.gguf`` file (built by
    transformers from its metadata, chat template included, and cached), of ``builtin:smollm2``, or
    the random model's character tokenizer for ``None`` / ``builtin:random``."""
    if path is None or str(path) == "builtin:random":
        return BuiltinTokenizer()
    if not isinstance(path, (str, Path)):
        raise CheckpointError(f"the tokenizer path must be a str or Path (or None), got {type(path).__name__}")
    if str(path) == SMOLLM2_NAME:
        path = require_smollm2()
    if is_gguf(path):
        return load_gguf_tokenizer(path)
    folder = Path(path)
    if not folder.is_dir():  # else transformers takes it for a hub name and talks about repo ids
        raise CheckpointError(f"{path}: {'not a directory' if folder.exists() else 'no such directory'}; "
                              "pass the checkpoint directory that holds the tokenizer files")
    known = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
    if not any((folder / name).is_file() for name in known):
        raise CheckpointError(f"{path}: no tokenizer files ({', '.join(known)}); copy the checkpoint's "
                              "tokenizer files into this directory")
    try:
        from transformers import AutoTokenizer  # slow to import; only checkpoints with their own tokenizer need it

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds for a missing or broken tokenizer
        raise CheckpointError(f"{path}: no usable tokenizer ({type(e).__name__}: {e})") from None
