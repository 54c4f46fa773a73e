"""A session: a batch of streams over one model, fed tokens in chunks of any length."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Protocol, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..contract import Geometry, UserError
from .cache import StreamingCache
from .config import ModelConfig
from .graphs import DecodeGraphs
from .kernel_backend import kernel_ops
from .recall import attach, recall_from_file

FORMAT = "streaming-trt-session"
VERSION = 2  # 2: keys stored rotated at their text position, model fingerprint by content, checksum


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def model_fingerprint(model) -> str:
    """A digest of the model's config and weights, computed once per model.

    Each tensor contributes its name, shape, dtype and up to 4096 evenly spaced values, so two
    models of one shape with other weights differ, at a cost independent of the model's size.
    """
    cached = getattr(model, "_session_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.config.to_hf_dict(), sort_keys=True).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}:{list(p.shape)}:{p.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    model._session_fingerprint = h.hexdigest()
    return model._session_fingerprint


def _checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(meta):
        if key != "checksum":
            h.update(f"{key}={meta[key]};".encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous().cpu()
        h.update(f"{key}:{list(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def token_batch(tokens, lengths, batch: int, vocab: int, device) -> tuple[torch.Tensor, list[int]]:
    """What :meth:`Session.feed` accepts, validated: ``[batch, n]`` int64 ids on ``device`` (padding
    zero) and the host-side valid length of each row; ``UserError`` saying what to change otherwise."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise UserError(f"token ids must be integers, got a {tokens.dtype} tensor")
        if tokens.dim() == 1:
            tokens = tokens.view(1, -1)
        if tokens.dim() != 2 or tokens.shape[0] != batch:
            raise UserError(f"tokens must have shape [batch={batch}, n], got {list(tokens.shape)}")
        n = tokens.shape[1]
        if lengths is None:
            lengths = [n] * batch
        else:
            lengths = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
            if len(lengths) != batch or not all(_is_int(x) and 0 <= x <= n for x in lengths):
                raise UserError(f"lengths must be {batch} integers in 0..{n}, got {lengths}")
        host = tokens.to("cpu", torch.int64)
        valid = torch.arange(n).view(1, -1) < torch.tensor(lengths).view(-1, 1)
        bad = valid & ((host < 0) | (host >= vocab))
        if bool(bad.any()):
            raise UserError(f"token id {int(host[bad][0])} is outside the vocabulary (0..{vocab - 1})")
        tokens = torch.where(valid, host, 0)
    else:
        if lengths is not None:
            raise UserError("lengths goes with a token tensor; token lists carry their own lengths")
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (list, tuple)):
            raise UserError(f"tokens must be a list of token ids (or one list per stream, or a tensor), "
                            f"got {type(tokens).__name__}; encode text with the tokenizer first")
        nested = len(tokens) > 0 and all(isinstance(r, (list, tuple)) for r in tokens)
        rows = [list(r) for r in tokens] if nested or batch > 1 else [list(tokens)]
        if len(rows) != batch:
            raise UserError(f"got token lists for {len(rows)} streams, the session has batch={batch}")
        for r in rows:
            for x in r:
                if not _is_int(x):
                    raise UserError(f"token ids must be integers, got {x!r} ({type(x).__name__})")
                if not 0 <= x < vocab:
                    raise UserError(f"token id {x} is outside the vocabulary (0..{vocab - 1})")
        lengths = [len(r) for r in rows]
        tokens = torch.zeros(batch, max(lengths), dtype=torch.int64)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return tokens.to(device), lengths


def sink_token_starts(sink_token_id: int | None, lengths: list[int], seen: list[int]) -> list[int] | None:
    """Which streams get a sink-token model's token 0 (config ``sink_token_id``) before a feed of
    ``lengths[b]`` tokens: 1 for each stream about to receive its first tokens (``seen[b] == 0``),
    0 for the others (a continued or restored stream never gets it again); None when nothing starts.
    The one home of this rule: the runtime, the ONNX runner and ``streaming_trt.hf`` all ask it."""
    if sink_token_id is None:
        return None
    starts = [int(length > 0 and done == 0) for length, done in zip(lengths, seen)]
    return starts if any(starts) else None


def merge_newest(last: torch.Tensor | None, newest: torch.Tensor, part: list[int]) -> torch.Tensor:
    """Each stream's newest logits ``[batch, vocab]`` after a forward that fed ``part[b]`` tokens to
    stream ``b``: ``newest`` where it was fed, ``last`` (zeros at first) where it was not."""
    if all(part):
        return newest
    if last is None:
        last = torch.zeros_like(newest)
    fed = torch.tensor([p > 0 for p in part], device=newest.device)
    return torch.where(fed.view(-1, 1), newest, last)


def feed_chunks(tokens: torch.Tensor, lengths: list[int], max_chunk: int, run, all_logits: bool, vocab: int,
                device, last: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The feed loop every stream session shares: ``tokens [batch, n]`` (row ``b`` valid for its
    first ``lengths[b]``) in forwards of at most ``max_chunk`` rows, each
    ``run(chunk [batch, width], part: list[int], all_rows: bool)`` returning the chunk's logits
    ``[batch, width, vocab]`` (``all_rows``) or each row's newest ``[batch, vocab]``.

    Returns ``(logits [batch, n, vocab] float32 on device, zero past a row's length, or None
    without all_logits; each stream's newest logits, updated from last)``."""
    batch, n = tokens.shape
    logits = torch.zeros(batch, n, vocab, device=device) if all_logits else None
    for lo in range(0, n, max_chunk):
        part = [min(max(length - lo, 0), max_chunk) for length in lengths]
        width = max(part)
        if width == 0:
            break
        out = run(tokens[:, lo : lo + width], part, all_logits)
        if all_logits:
            logits[:, lo : lo + width] = out
            rows = torch.arange(batch, device=out.device)
            out = out[rows, torch.tensor([max(p - 1, 0) for p in part], device=out.device)]
        last = merge_newest(last, out, part)
    return logits, last


def feed_stream(model, cache, tokens: torch.Tensor, lengths: list[int], max_chunk: int, all_logits: bool,
                last: torch.Tensor | None, graphs=None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The one feed path of the eager model (:class:`Session`'s and the serving engine's): a
    sink-token model's token 0 first, to each stream of ``cache`` about to receive its first
    tokens (never to a continued or restored stream, whose ``seen`` is past 0), then
    ``tokens [batch, n]`` (row ``b`` valid for its first ``lengths[b]``) in chunks of at most
    ``max_chunk``; a decode chunk is replayed from ``graphs`` (a DecodeGraphs) when given.
    Returns what :func:`feed_chunks` returns."""
    config = model.config
    starts = sink_token_starts(config.sink_token_id, lengths, cache.seen_host)
    if starts is not None:  # ``seen`` counts it; its logits predict the first token
        ids = torch.full((cache.batch, 1), config.sink_token_id, dtype=torch.int64, device=model.device)
        last = merge_newest(last, model(ids, cache, starts, last_only=True), starts)

    def run(chunk: torch.Tensor, part: list[int], all_rows: bool) -> torch.Tensor:
        if graphs is not None and chunk.shape[1] == 1 and all(part):
            newest = graphs(chunk).clone()
            return newest[:, None] if all_rows else newest
        # Chunks only ever hold a stream's newest tokens, so each row's last valid one is it.
        return model(chunk, cache, part, last_only=not all_rows)

    return feed_chunks(tokens, lengths, max_chunk, run, all_logits, config.vocab_size, model.device, last)


@dataclasses.dataclass
class SavedStreams:
    """A session file's contents, validated against the model (:func:`read_session_file`).
    ``keys``/``values [num_layers, batch, kv_heads, capacity, head_dim]``, ``seen`` per stream,
    ``last_logits [batch, vocab]`` or None, ``tensors``: everything read (the recall store's too)."""

    geometry: Geometry
    max_chunk: int
    fill: float
    keys: torch.Tensor
    values: torch.Tensor
    seen: list[int]
    last_logits: torch.Tensor | None
    recall: object | None  # the streaming_trt.runtime.recall.Recall the file was written with
    tensors: dict[str, torch.Tensor]


class StreamSession(Protocol):
    """What generation and the command lines ask of a batch of streams: :class:`Session` (eager),
    ``streaming_trt.export.onnx.OnnxSession`` (onnxruntime) and whatever else feeds a model. Both
    subclass it for ``sink_tokens`` and ``window``."""

    config: ModelConfig  # the model's
    device: torch.device  # where the logits come back
    geometry: Geometry
    batch: int
    max_chunk: int
    last_logits: torch.Tensor | None  # [batch, vocab] float32: each stream's newest

    @property
    def seen(self) -> list[int]: ...

    def feed(self, tokens, lengths=None, all_logits: bool = True) -> torch.Tensor: ...

    def reset(self, rows: list[int] | None = None) -> None: ...

    def save(self, path) -> None: ...

    def nbytes(self) -> int:
        """Bytes of the streams' key/value caches."""
        ...

    @property
    def sink_tokens(self) -> int:
        return self.geometry.sink_tokens

    @property
    def window(self) -> int:
        return self.geometry.window


class Session(StreamSession):
    """``batch`` independent streams with their own StreamingLLM caches.

    Args:
        model: a :class:`~streaming_trt.runtime.model.Transformer`.
        sink_tokens: S, the first tokens of each stream kept forever.
        window: W, the most recent tokens kept, the current one included (capacity = S + W).
        batch: number of streams.
        max_chunk: longer inputs are fed in pieces of this many tokens (the contract makes chunking
            invisible; it bounds the memory of one forward).
        cache_fill: value of never-written cache slots (tests use NaN to expose masking bugs).
        capture_decode: on CUDA, replay decode steps (one token per stream) from CUDA graphs
            captured on first use (:mod:`streaming_trt.runtime.graphs`); ignored on a CPU. Default: the
            model's ``cuda_graphs`` (True unless turned off, e.g. by ``--no-cuda-graphs``).
        recall: a :class:`~streaming_trt.runtime.recall.Recall`: evicted tokens go to a host block store
            and each forward attends to the most relevant blocks again (batch 1; prompts fed in
            chunks of at most ``recall.chunk``; no decode graphs). ``None``: plain StreamingLLM.
    """

    def __init__(self, model, sink_tokens: int = 4, window: int = 1020, batch: int = 1, max_chunk: int = 512,
                 cache_fill: float = 0.0, capture_decode: bool | None = None, recall=None):
        geometry = Geometry(sink_tokens, window)
        geometry.check_positions(model.config.max_position_embeddings)
        if not _is_int(batch) or batch < 1:
            raise UserError(f"batch must be an integer >= 1, got {batch!r}")
        if not _is_int(max_chunk) or max_chunk < 1:
            raise UserError(f"max_chunk must be an integer >= 1, got {max_chunk!r}")
        self.model = model
        self.max_chunk = max_chunk
        self.cache = StreamingCache(model.config, batch, geometry, model.dtype, model.device, kernel_ops(model.backend),
                                    model.inv_freq, cache_fill)
        self.last_logits: torch.Tensor | None = None  # [batch, vocab] logits of each stream's newest token
        self.graphs = None
        self.recall = None  # the streaming_trt.runtime.recall.BlockStore when recall is on
        if recall is not None:
            self.recall = attach(recall, model, self.cache)
            self.max_chunk = min(max_chunk, recall.chunk)
        if capture_decode is None:
            capture_decode = getattr(model, "cuda_graphs", True)
        if capture_decode and model.device.type == "cuda" and self.recall is None:
            self.graphs = DecodeGraphs(model, self.cache)

    @property
    def geometry(self) -> Geometry:
        return self.cache.geometry

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def nbytes(self) -> int:
        return self.cache.nbytes()

    @property
    def batch(self) -> int:
        return self.cache.batch

    @property
    def seen(self) -> list[int]:
        """Tokens fed so far, per stream."""
        return list(self.cache.seen_host)

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
        if not isinstance(all_logits, bool):
            raise UserError(f"all_logits must be True or False, got {all_logits!r}")
        tokens, lengths = token_batch(tokens, lengths, self.batch, self.model.config.vocab_size, self.model.device)
        logits, self.last_logits = feed_stream(self.model, self.cache, tokens, lengths, self.max_chunk, all_logits,
                                               self.last_logits, self.graphs)
        return logits if all_logits else self.last_logits

    def reset(self, rows: list[int] | None = None) -> None:
        """Start streams ``rows`` (all when None) afresh."""
        if rows is not None:
            rows = list(rows) if isinstance(rows, (list, tuple, range)) else None
            if rows is None or not all(_is_int(r) and 0 <= r < self.batch for r in rows):
                raise UserError(f"reset rows must be a list of stream indices in 0..{self.batch - 1}")
        self.cache.reset(rows)
        if self.recall is not None:
            self.recall.reset()
        if rows is None or set(rows) >= set(range(self.batch)):
            self.last_logits = None
        elif self.last_logits is not None:
            self.last_logits[rows] = 0

    def save(self, path: str | Path) -> None:
        """Write the whole state (cache, counters, newest logits) to one safetensors file,
        atomically, with the model's fingerprint and a checksum over everything in it."""
        c = self.cache
        tensors = {"keys": c.keys, "values": c.values, "seen": c.seen}
        if self.last_logits is not None:
            tensors["last_logits"] = self.last_logits
        write_session_file(path, self.model, tensors, c.geometry, self.max_chunk, c.fill_value, self.recall)

    @classmethod
    def load(cls, path: str | Path, model) -> "Session":
        """Restore a session written by :meth:`save`; it continues exactly where it stopped.

        Refuses (``UserError`` naming what differs) a file of another version, another model
        (by content, not only shape), or one whose contents were changed or are inconsistent.
        """
        saved = read_session_file(path, model)
        g = saved.geometry
        session = cls(model, g.sink_tokens, g.window, batch=len(saved.seen), max_chunk=saved.max_chunk,
                      cache_fill=saved.fill, recall=saved.recall)
        if session.recall is not None:
            session.recall.load_tensors(path, saved.tensors)
        session.cache.keys.copy_(saved.keys)
        session.cache.values.copy_(saved.values)
        session.cache.set_seen(saved.seen)
        if saved.last_logits is not None:
            session.last_logits = saved.last_logits.to(model.device)
        return session


def write_session_file(path: str | Path, model, tensors: dict[str, torch.Tensor], geometry: Geometry, max_chunk: int,
                       fill: float, recall=None) -> None:
    """The session file format, its one writer (:meth:`Session.save`, the serving engine's
    states): ``tensors`` (``keys``/``values [layers, batch, kv, C, d]``, ``seen [batch]``,
    optionally ``last_logits [batch, vocab]``) and those of ``recall`` (a BlockStore), with the
    metadata, the model's fingerprint and a checksum, written atomically and durably."""
    tensors = dict(tensors)
    if recall is not None:
        tensors.update(recall.tensors())
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "model": model_fingerprint(model),
        "model_shape": model.config.fingerprint(),
        "sink_tokens": str(geometry.sink_tokens),
        "window": str(geometry.window),
        "max_chunk": str(max_chunk),
        "cache_fill": repr(float(fill)),
    }
    if recall is not None:
        meta["recall"] = recall.settings()
    meta["checksum"] = _checksum(tensors, meta)
    path = Path(path)
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise UserError(f"{path}: cannot save the session, {path.parent} {what}")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a crash's leftover; a link planted there is not followed
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))  # private from its first byte
        save_file(tensors, str(tmp), metadata=meta)
        _durable_replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot save the session ({e})") from None


def read_session_file(path: str | Path, model) -> SavedStreams:
    """Read a file of :func:`write_session_file` for ``model``, validated: ``UserError`` naming what
    differs for a file of another version, another model (by content, not only shape), or one
    whose contents were changed or are inconsistent."""

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot be read as a saved session ({e})") from None
    if meta.get("format") not in (FORMAT, f"{FORMAT}/1"):
        raise UserError(f"{path}: not a streaming-trt session file")
    version = meta.get("version", "1")
    if version != str(VERSION):
        raise UserError(f"{path}: a session file of format version {version}, written by another version of "
                        f"streaming-trt; this one reads version {VERSION} (its caches store keys rotated), so "
                        "the conversation must be started again")
    if meta.get("checksum") != _checksum(tensors, meta):
        raise UserError(f"{path}: the file's contents do not match its checksum: it was changed or damaged")
    if meta.get("model") != model_fingerprint(model):
        raise UserError(f"{path}: saved for another model ({meta.get('model_shape')}, weights "
                        f"{str(meta.get('model'))[:12]}), but the loaded model is "
                        f"{model.config.fingerprint()}, weights {model_fingerprint(model)[:12]}")
    try:
        sink_tokens, window, max_chunk = (int(meta[k]) for k in ("sink_tokens", "window", "max_chunk"))
        fill = float(meta["cache_fill"])
        keys, values, seen = tensors["keys"], tensors["values"], tensors["seen"]
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: the session file lacks or mangles {e}") from None
    geometry = Geometry(sink_tokens, window)
    c = model.config
    shape = (c.num_layers, seen.shape[0] if seen.dim() == 1 else -1, c.num_kv_heads, geometry.capacity, c.head_dim)
    problems = []
    if seen.dim() != 1 or seen.dtype != torch.int64 or seen.numel() < 1 or bool((seen < 0).any()):
        problems.append(f"stream counters {seen.tolist()} must be one integer >= 0 per stream")
    for name, t in (("keys", keys), ("values", values)):
        if tuple(t.shape) != shape or t.dtype != model.dtype:
            problems.append(f"{name} are {list(t.shape)} {t.dtype}, the model needs {list(shape)} {model.dtype}")
    last = tensors.get("last_logits")
    if last is not None and (tuple(last.shape) != (seen.shape[0], c.vocab_size) or not bool(last.isfinite().all())):
        problems.append("the newest logits are mis-shaped or not finite")
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    written = geometry.slot_tokens(seen) >= 0  # [batch, capacity]
    for name, t in (("keys", keys), ("values", values)):
        if not bool(t.float().isfinite().all(-1).all(2).all(0)[written].all()):
            raise UserError(f"{path}: the cached {name} hold non-finite values")
    if not math.isnan(fill) and not bool((keys.float().isfinite()).all()):
        raise UserError(f"{path}: the cache holds non-finite values")
    recall = None
    if "recall" in meta:
        recall = recall_from_file(path, meta["recall"])
    return SavedStreams(geometry, max_chunk, fill, keys, values, seen.tolist(), last, recall, tensors)


def _durable_replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` over ``path`` so that a power cut leaves the old or the new file whole: the data
    reaches the disk before the rename, the rename before returning. Session files hold a
    conversation: readable by their owner only (0600)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
