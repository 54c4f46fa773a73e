"""A session: a batch of streams over one model, fed tokens in chunks of any length."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch

from .cache import StreamingCache
from .errors import UserError

FORMAT = "streaming-trt-session/1"


def check_window(sink_tokens: int, window: int, max_position_embeddings: int | None = None) -> None:
    """Validate cache sizes; warn where the model never saw the positions the cache will use."""
    if not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise UserError(f"sink_tokens must be an integer >= 0, got {sink_tokens!r}")
    if not isinstance(window, int) or window < 1:
        raise UserError(f"window must be an integer >= 1 (it counts the current token), got {window!r}")
    capacity = sink_tokens + window
    if max_position_embeddings is not None and capacity > max_position_embeddings:
        warnings.warn(
            f"capacity sink_tokens + window = {capacity} exceeds the model's max_position_embeddings "
            f"({max_position_embeddings}): the model never saw positions >= {max_position_embeddings}; "
            f"choose a window <= {max_position_embeddings - sink_tokens}",
            stacklevel=3,
        )


class Session:
    """``batch`` independent streams with their own StreamingLLM caches.

    Args:
        model: a :class:`~streaming_trt.model.Transformer`.
        sink_tokens: S, the first tokens of each stream kept forever.
        window: W, the most recent tokens kept, the current one included (capacity = S + W).
        batch: number of streams.
        max_chunk: longer inputs are fed in pieces of this many tokens (the contract makes chunking
            invisible; it bounds the memory of one forward).
        cache_fill: value of never-written cache slots (tests use NaN to expose masking bugs).
    """

    def __init__(self, model, sink_tokens: int = 4, window: int = 1020, batch: int = 1, max_chunk: int = 512,
                 cache_fill: float = 0.0):
        check_window(sink_tokens, window, model.config.max_position_embeddings)
        if batch < 1:
            raise UserError(f"batch must be >= 1, got {batch}")
        if max_chunk < 1:
            raise UserError(f"max_chunk must be >= 1, got {max_chunk}")
        self.model = model
        self.max_chunk = max_chunk
        self.cache = StreamingCache(model.config, batch, sink_tokens, window, model.dtype, model.device, cache_fill)
        self.last_logits: torch.Tensor | None = None  # [batch, vocab] logits of each stream's newest token

    @property
    def sink_tokens(self) -> int:
        return self.cache.sink_tokens

    @property
    def window(self) -> int:
        return self.cache.window

    @property
    def batch(self) -> int:
        return self.cache.batch

    @property
    def seen(self) -> list[int]:
        """Tokens fed so far, per stream."""
        return self.cache.seen.tolist()

    def feed(self, tokens, lengths: torch.Tensor | Sequence[int] | None = None, all_logits: bool = True) -> torch.Tensor:
        """Append tokens to the streams and return their logits.

        Args:
            tokens: a list of ids (batch 1), a list of lists (one per stream, any lengths, empty
                allowed), or a LongTensor ``[batch, n]`` right-padded.
            lengths: with a tensor, the valid tokens per row (default: all ``n``).
            all_logits: False returns only each stream's newest logits and never holds
                ``[n, vocab]`` of them: what generation wants from a long prompt.
        Returns:
            float32 logits ``[batch, n, vocab]`` of every token fed (zero past a stream's
            length), or ``[batch, vocab]`` (``last_logits``) when ``all_logits`` is False.
        """
        tokens, lengths = self._as_batch(tokens, lengths)
        n, vocab = tokens.shape[1], self.model.config.vocab_size
        logits = torch.zeros(self.batch, n, vocab, device=self.model.device) if all_logits else None
        for lo in range(0, n, self.max_chunk):
            part = (lengths - lo).clamp(min=0, max=self.max_chunk)
            width = int(part.max())
            if width == 0:
                break
            fed = part > 0
            if not all_logits:
                # Chunks only ever hold a stream's newest tokens, so each row's last valid one is it.
                self._set_last(self.model(tokens[:, lo : lo + width], self.cache, part, last_only=True), fed)
                continue
            out = self.model(tokens[:, lo : lo + width], self.cache, part)
            logits[:, lo : lo + width] = out
            self._set_last(out[torch.arange(self.batch, device=out.device), (part - 1).clamp(min=0)], fed)
        return logits if all_logits else self.last_logits

    def _set_last(self, newest: torch.Tensor, fed: torch.Tensor) -> None:
        if self.last_logits is None:
            self.last_logits = torch.zeros_like(newest)
        self.last_logits = torch.where(fed.view(-1, 1), newest, self.last_logits)

    def _as_batch(self, tokens, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.model.device
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() == 1:
                tokens = tokens.view(1, -1)
            if tokens.dim() != 2 or tokens.shape[0] != self.batch:
                raise UserError(f"tokens must have shape [batch={self.batch}, n], got {list(tokens.shape)}")
            lengths = (torch.full((self.batch,), tokens.shape[1]) if lengths is None else torch.as_tensor(lengths))
        else:
            rows = [list(tokens)] if self.batch == 1 and (len(tokens) == 0 or not isinstance(tokens[0], (list, tuple)))\
                else [list(r) for r in tokens]
            if len(rows) != self.batch:
                raise UserError(f"got token lists for {len(rows)} streams, the session has batch={self.batch}")
            width = max(len(r) for r in rows)
            tokens = torch.zeros(self.batch, width, dtype=torch.int64)
            for b, r in enumerate(rows):
                tokens[b, : len(r)] = torch.as_tensor(r, dtype=torch.int64)
            lengths = torch.tensor([len(r) for r in rows])
        tokens, lengths = tokens.to(device=device, dtype=torch.int64), lengths.to(device=device, dtype=torch.int64)
        if lengths.shape != (self.batch,) or bool((lengths < 0).any()) or bool((lengths > tokens.shape[1]).any()):
            raise UserError(f"lengths must be {self.batch} values in 0..{tokens.shape[1]}, got {lengths.tolist()}")
        valid = torch.arange(tokens.shape[1], device=device).view(1, -1) < lengths.view(-1, 1)
        vocab = self.model.config.vocab_size
        bad = valid & ((tokens < 0) | (tokens >= vocab))
        if bool(bad.any()):
            raise UserError(f"token id {int(tokens[bad][0])} is outside the vocabulary (0..{vocab - 1})")
        return torch.where(valid, tokens, 0), lengths

    def reset(self, rows: list[int] | None = None) -> None:
        """Start streams ``rows`` (all when None) afresh."""
        self.cache.reset(rows)
        if rows is None or set(rows) >= set(range(self.batch)):
            self.last_logits = None
        elif self.last_logits is not None:
            self.last_logits[rows] = 0

    def save(self, path: str | Path) -> None:
        """Write the whole state (cache, counters, newest logits) to one safetensors file."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        c = self.cache
        tensors = {"keys": c.keys, "values": c.values, "seen": c.seen}
        if self.last_logits is not None:
            tensors["last_logits"] = self.last_logits
        meta = {
            "format": FORMAT,
            "model": self.model.config.fingerprint(),
            "sink_tokens": str(c.sink_tokens),
            "window": str(c.window),
            "max_chunk": str(self.max_chunk),
            "cache_fill": str(c.fill_value),
        }
        path = Path(path)
        if not path.parent.is_dir():
            raise UserError(f"{path}: cannot save the session, directory {path.parent} does not exist")
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
            tmp.replace(path)
        except (OSError, SafetensorError) as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"{path}: cannot save the session ({e})") from None

    @classmethod
    def load(cls, path: str | Path, model) -> "Session":
        """Restore a session written by :meth:`save`; it continues exactly where it stopped."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: cannot be read as a saved session ({e})") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{path}: not a streaming-trt session file")
        if meta.get("model") != model.config.fingerprint():
            raise UserError(
                f"{path}: saved for model {meta.get('model')}, but the loaded model is {model.config.fingerprint()}"
            )
        keys = tensors["keys"]
        session = cls(model, int(meta["sink_tokens"]), int(meta["window"]), batch=keys.shape[1],
                      max_chunk=int(meta["max_chunk"]), cache_fill=float(meta.get("cache_fill", 0.0)))
        session.cache.keys.copy_(keys)
        session.cache.values.copy_(tensors["values"])
        session.cache.seen.copy_(tensors["seen"])
        if "last_logits" in tensors:
            session.last_logits = tensors["last_logits"].to(model.device)
        return session
