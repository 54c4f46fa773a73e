"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed."""
from __future__ import annotations

import dataclasses
import math

import torch

from .errors import UserError


GREEDY_BELOW = 1e-5  # smaller temperatures would overflow the scaled logits; they mean greedy


@dataclasses.dataclass
class SamplingParams:
    """How tokens are drawn. ``temperature == 0`` (or below 1e-5) is greedy; ``top_k == 0`` and
    ``top_p == 1`` are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also refuses NaN
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    """Draws next tokens for a batch; a seed makes the draws repeatable."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()  # fresh entropy, leaving torch's global generator alone
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [batch, vocab]`` float -> token ids ``[batch]`` int64."""
        p = self.params
        if p.temperature < GREEDY_BELOW:
            return logits.argmax(dim=-1)
        logits = logits.float() / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the tokens ranked above it already reach top_p
            drop = probs.cumsum(-1) - probs >= p.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).view(-1)
