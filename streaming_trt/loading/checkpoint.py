"""Reading Hugging Face checkpoint directories (config.json + safetensors, sharded or not)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..contract import CheckpointError
from ..runtime.config import ModelConfig
from ..runtime.model import check_state_dict, expected_shapes


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but not found")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (only safetensors checkpoints are supported)")
    return files


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read ``config.json`` and every tensor the model needs, with Hugging Face names.

    Returns the config and a dict of CPU tensors in their stored dtype. Tensors the model does not
    use (rotary buffers, a duplicated tied lm_head) are dropped.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a Hugging Face checkpoint directory")
    config = ModelConfig.from_dir(path)
    wanted = expected_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    for file in _shard_files(path):
        try:
            loaded = load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot be read as safetensors ({e})") from None
        tensors.update({k: v for k, v in loaded.items() if k in wanted})
    check_state_dict(config, tensors, str(path))
    return config, tensors
