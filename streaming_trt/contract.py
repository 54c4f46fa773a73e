"""The contract every layer shares, in one leaf module: the cache geometry, the exact rotary
angles and the errors meant for the user (docs/contract.md states the contract in words).

Imports only the standard library and torch, so the kernels (``streaming_trt.kernels``), the
runtime, ``streaming_trt.hf``, the exports and the benchmarks all depend on it and it on none of
them. Every module asks a :class:`Geometry` for capacity, slots, ranks and A(t) instead of
re-deriving them from ``sink_tokens`` and ``window``.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch

__all__ = ["Geometry", "exact_angles", "UserError", "CheckpointError", "UnsupportedModelError"]


class UserError(Exception):
    """Bad input (arguments, files, settings); the message says what to change. The CLIs print it
    and exit with status 2."""


class CheckpointError(UserError):
    """A model directory that is missing, corrupt, or does not match its config."""


class UnsupportedModelError(UserError):
    """A model type or setting this library does not implement."""


def exact_angles(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """float64 angles ``[*positions.shape, rotary_dim // 2]`` in [0, 2*pi) at int ``positions``
    (any size, any sign): ``position * inv_freq`` formed in float64, then reduced.

    Keys are stored rotated at their text position, which grows without bound; float32 angles at
    t = 4,000,000 are off by tenths of a radian, these are exact to float64 rounding.
    """
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float64)
    return torch.remainder(positions.to(torch.float64).unsqueeze(-1) * inv_freq, 2 * math.pi)



def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """``sink_tokens`` (S >= 0) kept forever plus a ring of the last ``window`` (W >= 1) tokens,
    the current one included; capacity C = S + W.

    Token ``u`` of a stream lives in slot ``u`` when ``u < S`` and in ring slot
    ``S + (u - S) % W`` otherwise. Before a stream is full (``seen <= C``) slot ``s`` holds token
    ``s``, so the slots in use are exactly ``0 .. seen - 1``.
    """

    sink_tokens: int
    window: int

    def __post_init__(self):
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            raise UserError(f"sink_tokens must be an integer >= 0, got {self.sink_tokens!r}")
        if not _is_int(self.window) or self.window < 1:
            raise UserError(f"window must be an integer >= 1 (it counts the current token), got {self.window!r}")

    @classmethod
    def with_capacity(cls, capacity: int, sink_tokens: int) -> "Geometry":
        """The geometry of a cache of ``capacity`` slots, ``sink_tokens`` of them sinks, the rest the window."""
        if not _is_int(capacity) or not _is_int(sink_tokens) or capacity <= sink_tokens:
            raise UserError(f"a cache of {capacity} tokens cannot hold {sink_tokens} sink tokens plus a window "
                            "(the capacity must exceed sink_tokens)")
        return cls(sink_tokens, capacity - sink_tokens)

    @property
    def capacity(self) -> int:
        return self.sink_tokens + self.window

    def rank(self, t):
        """Rotary position of token ``t``'s query: ``min(t, C - 1)`` (int or int tensor)."""
        if isinstance(t, torch.Tensor):
            return t.clamp(max=self.capacity - 1)
        return min(t, self.capacity - 1)

    def slot(self, u):
        """Cache slot of token ``u`` (int or int64 tensor)."""
        s = self.sink_tokens
        if isinstance(u, torch.Tensor):
            return torch.where(u < s, u, s + (u - s) % self.window)
        return u if u < s else s + (u - s) % self.window

    def attended(self, t: int) -> list[int]:
        """A(t), in order: the sinks ``0 .. min(S, t+1) - 1``, then ``max(S, t-W+1) .. t``."""
        s = self.sink_tokens
        return list(range(min(s, t + 1))) + list(range(max(s, t - self.window + 1), t + 1))

    def visible(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Whether token ``u`` is in A(t), elementwise over broadcast int tensors."""
        return (u >= 0) & (u <= t) & ((u < self.sink_tokens) | (u > t - self.window))

    def slot_tokens(self, seen: torch.Tensor) -> torch.Tensor:
        """``seen [batch]`` tokens stored per stream -> ``[batch, capacity]`` int64, the token in
        each slot, ``-1`` for a slot never written."""
        s, w = self.sink_tokens, self.window
        seen = seen.to(torch.int64).view(-1, 1)
        slot = torch.arange(self.capacity, device=seen.device).view(1, -1)
        ring = slot - s  # offset inside the ring, negative for sink slots
        last = seen - 1 - s - ring  # how far the newest candidate lies past this slot
        ring_token = s + ring + w * torch.div(last, w, rounding_mode="floor")
        token = torch.where(ring < 0, slot, ring_token)
        written = torch.where(ring < 0, slot < seen, last >= 0)
        return torch.where(written, token, torch.full_like(token, -1))

    def kept(self, start: torch.Tensor, lengths: torch.Tensor, chunk: int) -> torch.Tensor:
        """``[batch, chunk]`` bool: which rows of a chunk (tokens ``start + i``, ``i < lengths``)
        are still in the cache once the whole chunk is stored (sinks, and the last W tokens)."""
        idx = torch.arange(chunk, device=start.device).view(1, -1)
        token = start.to(torch.int64).view(-1, 1) + idx
        end = (start + lengths).to(torch.int64).view(-1, 1)
        return (idx < lengths.view(-1, 1)) & ((token < self.sink_tokens) | (token >= end - self.window))

    def cache_bytes(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of keys plus values for ``batch`` streams."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * batch * num_kv_heads * self.capacity * head_dim * itemsize

    def check_positions(self, max_position_embeddings: int | None, stacklevel: int = 3) -> None:
        """Warn where the model never saw the positions this cache uses (ranks up to C - 1)."""
        if max_position_embeddings is not None and self.capacity > max_position_embeddings:
            fit = max_position_embeddings - self.sink_tokens
            advice = (f"choose a window <= {fit}" if fit >= 1
                      else f"choose sink_tokens + window <= {max_position_embeddings}")
            warnings.warn(
                f"capacity sink_tokens + window = {self.capacity} exceeds the model's max_position_embeddings "
                f"({max_position_embeddings}): the model never saw positions >= {max_position_embeddings}; {advice}",
                stacklevel=stacklevel,
            )
