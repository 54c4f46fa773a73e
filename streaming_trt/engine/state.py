"""A conversation's stream as one value, kept in host memory between its turns."""
from __future__ import annotations

from pathlib import Path

import torch

from ..contract import Geometry, UserError
from ..runtime.recall import new_store
from ..runtime.session import model_fingerprint, read_session_file, write_session_file

MAX_CHUNK = 512  # what a session file records; a Session opened on it feeds prompts in chunks of this


class StreamState:
    """One stream of ``model``: what its next token needs, and what identifies it.

    ``keys``/``values``: ``[num_layers, kv_heads, capacity, head_dim]`` in the model's dtype, on
    the host (never-written slots hold ``fill_value``). ``seen``: tokens fed so far.
    ``last_logits``: ``[vocab]`` float32 of the newest token (None before any). ``recall``: the
    stream's :class:`~streaming_trt.runtime.recall.BlockStore` when recall is on (host memory already; it is
    handed to the runner, not copied). ``fingerprint``: the model's (see
    :func:`~streaming_trt.runtime.session.model_fingerprint`). Its file is a batch-1 session file, so
    ``Session.load`` opens it and :meth:`load` refuses another model's, a damaged or a foreign one.
    """

    def __init__(self, model, geometry: Geometry, fill_value: float = 0.0, recall=None):
        c = model.config
        shape = (c.num_layers, c.num_kv_heads, geometry.capacity, c.head_dim)
        self.model, self.geometry, self.fill_value = model, geometry, fill_value
        self.fingerprint = model_fingerprint(model)
        pinned = model.device.type == "cuda"  # host memory the GPU copies to and from directly
        self.keys = torch.full(shape, fill_value, dtype=model.dtype, pin_memory=pinned)
        self.values = torch.full(shape, fill_value, dtype=model.dtype, pin_memory=pinned)
        self.seen = 0
        self.last_logits: torch.Tensor | None = None
        self.recall = None if recall is None else new_store(recall, model, geometry)

    def nbytes(self) -> int:
        """Host bytes it holds (cache, newest logits, block store)."""
        n = self.keys.nbytes + self.values.nbytes
        n += 0 if self.last_logits is None else self.last_logits.nbytes
        return n + (0 if self.recall is None else self.recall.nbytes())

    # -- moving in and out of a batched cache: the only copies of its fields ------------------

    def write_to(self, cache, row: int, logits: torch.Tensor) -> None:
        """Put this stream into row ``row`` of ``cache`` (a StreamingCache of the same geometry)
        and its newest logits into ``logits [vocab]``; its block store becomes the row's."""
        if cache.geometry != self.geometry:
            raise UserError(f"a conversation saved with {self.geometry} cannot run in a cache of {cache.geometry}")
        if (self.recall is None) != (cache.stores is None):
            have, want = ("with", "without") if self.recall is not None else ("without", "with")
            raise UserError(f"a conversation saved {have} recall cannot continue on a server {want} it; start it again")
        cache.write_row(row, self.keys, self.values, self.seen)
        if cache.stores is not None:
            cache.stores[row] = self.recall
        if self.last_logits is None:
            logits.zero_()
        else:
            logits.copy_(self.last_logits)

    def read_from(self, cache, row: int, logits: torch.Tensor) -> None:
        """Take row ``row`` of ``cache`` (and ``logits [vocab]``, its newest) as this stream's state."""
        self.seen = cache.read_row(row, self.keys, self.values)
        if self.last_logits is None:
            self.last_logits = torch.empty(logits.shape, dtype=torch.float32)
        self.last_logits.copy_(logits)
        self.recall = None if cache.stores is None else cache.stores[row]

    # -- files -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write it as a batch-1 session file (atomically, durably; see ``write_session_file``)."""
        tensors = {"keys": self.keys.unsqueeze(1), "values": self.values.unsqueeze(1),
                   "seen": torch.tensor([self.seen], dtype=torch.int64)}
        if self.last_logits is not None:
            tensors["last_logits"] = self.last_logits.unsqueeze(0)
        write_session_file(path, self.model, tensors, self.geometry, MAX_CHUNK, self.fill_value, self.recall)

    @classmethod
    def load(cls, path: str | Path, model) -> "StreamState":
        """The state a file of :meth:`save` (or a batch-1 ``Session.save``) holds; ``UserError``
        for a file of another model, version or batch, or a damaged one."""
        saved = read_session_file(path, model)
        if len(saved.seen) != 1:
            raise UserError(f"{path}: holds {len(saved.seen)} streams; a conversation is one")
        state = cls(model, saved.geometry, saved.fill, saved.recall)
        if state.recall is not None:
            state.recall.load_tensors(path, saved.tensors)
        state.keys.copy_(saved.keys[:, 0])
        state.values.copy_(saved.values[:, 0])
        state.seen = saved.seen[0]
        if saved.last_logits is not None:
            state.last_logits = saved.last_logits[0].float().clone()
        return state
