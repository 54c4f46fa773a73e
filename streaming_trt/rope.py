"""Rotary tables. Positions never exceed the cache capacity, so rope scaling is applied once here."""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """``[rotary_dim // 2]`` float64 inverse frequencies, with the config's rope scaling applied."""
    dim = config.rotary_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_len / low, inv / factor, torch.where(wavelen < old_len / high, inv, mid))
    return inv


def rotary_table(config: ModelConfig, num_positions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[num_positions, rotary_dim // 2]`` float32 for positions ``0 .. num_positions-1``."""
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * inverse_frequencies(config)[None, :]
    return angles.cos().float().to(device), angles.sin().float().to(device)
