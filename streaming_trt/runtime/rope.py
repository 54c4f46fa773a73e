"""Rotary angles, exact at any text position.

Keys are stored rotated at their text position, which grows without bound, so the angle
``position * inv_freq`` is formed in float64 and reduced mod 2*pi before cos/sin are taken (float32
angles at t = 4,000,000 are off by tenths of a radian). Every supported rope type (default, linear,
llama3) only changes the inverse frequencies, so this stays exact.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig
from ..contract import exact_angles


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


def rotary_angles(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[*positions.shape, rotary_dim // 2]`` float32 at int ``positions`` (any size).

    ``inv_freq``: ``[rotary_dim // 2]`` float64 inverse frequencies.
    """
    angles = exact_angles(inv_freq, positions)
    return angles.cos().float(), angles.sin().float()


def rotary_table(config: ModelConfig, num_positions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[num_positions, rotary_dim // 2]`` float32 for positions ``0 .. num_positions-1``."""
    positions = torch.arange(num_positions, device=device)
    return rotary_angles(inverse_frequencies(config).to(device), positions)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., head_dim]`` by ``cos``/``sin [..., rotary_dim // 2]`` (broadcast), the
    rotate-half (Llama / GPT-NeoX) convention: for ``x = [x1, x2, rest]`` with ``x1, x2`` of width
    ``rotary_dim // 2``, ``rot(x) = [x1 cos - x2 sin, x2 cos + x1 sin, rest]``."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if 2 * half < x.shape[-1]:  # partial rotary; no empty tensor in the traced ONNX graph otherwise
        parts.append(x[..., 2 * half :])
    return torch.cat(parts, dim=-1)
