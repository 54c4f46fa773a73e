"""The streaming KV cache: sink slots kept forever plus a ring of the most recent tokens."""
from __future__ import annotations

import torch

from .config import ModelConfig


class StreamingCache:
    """Keys and values of ``batch`` streams, ``sink_tokens + window`` slots each, for every layer.

    ``keys``/``values``: ``[num_layers, batch, num_kv_heads, capacity, head_dim]``, keys stored
    before rotation; slot rule and layout as in :mod:`streaming_trt.kernels.reference`.
    ``seen``: ``[batch]`` int64, tokens each stream has stored. The tensors are allocated once;
    streams of any length reuse them.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        sink_tokens: int,
        window: int,
        dtype: torch.dtype,
        device: torch.device,
        fill_value: float = 0.0,
    ):
        self.sink_tokens, self.window = sink_tokens, window
        self.capacity = sink_tokens + window
        shape = (config.num_layers, batch, config.num_kv_heads, self.capacity, config.head_dim)
        self.keys = torch.full(shape, fill_value, dtype=dtype, device=device)
        self.values = torch.full(shape, fill_value, dtype=dtype, device=device)
        self.seen = torch.zeros(batch, dtype=torch.int64, device=device)
        self.fill_value = fill_value

    @property
    def batch(self) -> int:
        return self.seen.shape[0]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget streams ``rows`` (all when None); their slots are refilled, memory is kept."""
        index = slice(None) if rows is None else torch.as_tensor(rows, device=self.seen.device)
        self.keys[:, index] = self.fill_value
        self.values[:, index] = self.fill_value
        self.seen[index] = 0
