"""``load_model``: a Hugging Face checkpoint directory or a llama.cpp ``.gguf`` file into a :class:`Transformer`."""
from __future__ import annotations

from pathlib import Path

import torch

from ..contract import UserError
from ..runtime.model import Transformer
from .checkpoint import load_checkpoint
from .gguf import is_gguf, load_gguf


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> Transformer:
    """Load a Hugging Face checkpoint directory (config.json + safetensors) or a llama.cpp ``.gguf`` file.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (sharded or not), or a ``.gguf``
            file (dequantized to float32 once, then cached; see :mod:`streaming_trt.loading.gguf`).
        dtype: ``float32``, ``float16`` or ``bfloat16`` (name or torch dtype).
        device: ``cpu`` or ``cuda[:i]``.
        backend: ``auto`` (Triton kernels on CUDA, PyTorch otherwise), ``torch`` or ``triton``.
    """
    if not isinstance(path, (str, Path)):
        raise UserError(f"load_model needs a checkpoint directory or .gguf file path, got {type(path).__name__}")
    config, tensors = load_gguf(path) if is_gguf(path) else load_checkpoint(path)
    return Transformer.from_state_dict(config, tensors, dtype=dtype, device=device, backend=backend, source=str(path))
