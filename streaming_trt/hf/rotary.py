"""Rotary embeddings at exact angles for transformers models, and the second rotation of a query."""
from __future__ import annotations

import torch
from torch import nn

from ..contract import exact_angles
from ..runtime.rope import apply_rotary


class ExactRotary(nn.Module):
    """Drop-in for a transformers rotary module (``forward(x, position_ids[, layer_type]) -> (cos, sin)``,
    each ``[B, q, rotary_dim]`` in ``x.dtype``) with float64 angles reduced mod 2*pi.

    Uses the wrapped module's ``inv_freq`` / ``attention_scaling`` (or ``{layer_type}_inv_freq`` ...),
    i.e. its rope scaling, frozen at construction.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original

    def frequencies(self, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
        if layer_type is not None and hasattr(self.original, f"{layer_type}_inv_freq"):
            return (getattr(self.original, f"{layer_type}_inv_freq"),
                    float(getattr(self.original, f"{layer_type}_attention_scaling", 1.0)))
        return self.original.inv_freq, float(getattr(self.original, "attention_scaling", 1.0))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        inv_freq, scale = self.frequencies(layer_type)
        ang = exact_angles(inv_freq, position_ids)
        emb = torch.cat((ang, ang), dim=-1)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def rotate_heads(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, q, D]`` (rotate-half convention on its first ``2F`` dims) by float64
    ``angles [B, q, F]`` (a pure rotation: no attention scaling)."""
    angles = angles.unsqueeze(1)  # [B, 1, q, F]: every head alike
    return apply_rotary(x, angles.cos(), angles.sin())
