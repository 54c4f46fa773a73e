"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed."""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .errors import UserError


GREEDY_BELOW = 1e-5  # smaller temperatures would overflow the scaled logits; they mean greedy


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass
class SamplingParams:
    """How tokens are drawn. ``temperature == 0`` (or below 1e-5) is greedy; ``top_k == 0`` and
    ``top_p == 1`` are off. Order: temperature, then top-k, then top-p on what top-k kept."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (_is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k!r}")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):  # also refuses NaN
            raise UserError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise UserError(f"seed must be an integer or None, got {self.seed!r}")


class Sampler:
    """Draws next tokens for a batch; a seed makes the draws repeatable."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()  # fresh entropy, leaving torch's global generator alone
        else:
            self.generator.manual_seed(params.seed)

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [batch, vocab]`` -> float32 probabilities ``[batch, vocab]`` the next token is
        drawn from (not for greedy parameters): the smallest set of most likely tokens whose
        probability reaches ``top_p`` is kept, so the token that crosses the threshold stays."""
        p = self.params
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
        return torch.softmax(logits, dim=-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [batch, vocab]`` float -> token ids ``[batch]`` int64."""
        if self.params.temperature < GREEDY_BELOW:
            return logits.argmax(dim=-1)
        return torch.multinomial(self.distribution(logits), 1, generator=self.generator).view(-1)
