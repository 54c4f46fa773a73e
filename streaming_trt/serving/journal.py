"""A conversation's file at the cost of a turn: a base snapshot plus an append log of turn records.

A ring cache changes only the slots a turn wrote (tokens ``seen_before .. seen_after - 1``, at
most S + W slots however long the turn), so each finished turn appends one record holding those
slots' keys and values for every layer, the new counter and the newest logits, and fsyncs it
before the turn is acknowledged. When the records outgrow ``compact_ratio`` times the whole cache,
a background thread folds them into a new base (written beside the file, fsynced, renamed over it).

One file per conversation, ``<session_dir>/<id:020d>.session`` (the layout is in docs/serving.md,
"Session files")::

    header  MAGIC | u32 n | JSON (n bytes) | blake2b-128 of the three
    base    keys | values | logits       raw bytes, absent while the base is the empty cache
    record  b"TURN" | u64 payload bytes | u64 generation | u32 crc32 of those 20 bytes
            | payload | blake2b-128 of prefix and payload
            payload: u64 seen_before | u64 seen_after | u8 has logits | u8 ranges
                     | (u32 lo, u32 hi) per range | keys of the ranges | values of the ranges | logits

Loading replays the records over the base and checks every digest, the generation chain and that
each record holds exactly the slots the geometry says its turn wrote. A torn last record (a crash
while it was written: never acknowledged) is dropped and the file cut back to the turn before; a
damaged record with turns after it, a damaged header or base, another model's or another
version's file are refused (``UserError``), never loaded wrong.

Several servers may share the directory (:mod:`.store`, :mod:`.lease`): each record's generation is
the previous one + 1, and this journal appends only where the file ends at the generation it last
wrote or read; a complete record of another writer there refuses the append (:class:`FileChanged`,
the file left whole), a torn one is cut off. :meth:`Journal.current` tells whether a copy in memory
is still the file's newest turn (same file, same length, same newest generation).

Recall conversations (their block store is not in the record) keep the whole rewrite
(:meth:`StreamState.save`); :meth:`Journal.load` reads those files and any written before the
journal. The only code that knows the state's type is :func:`state_fields` and :func:`state_from`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import torch

from ..contract import Geometry, UserError
from ..engine import StreamState
from ..runtime.session import model_fingerprint
from .protocol import ErrorKind, ServingError

SUFFIX = ".session"


def session_path(directory, cid: int) -> Path:
    """Conversation ``cid``'s session file in ``directory``."""
    return Path(directory) / f"{int(cid):020d}{SUFFIX}"

MAGIC = b"\x89STRTJ\r\n"  # not text, not a plausible safetensors header length
FORMAT = "streaming-trt-journal"
VERSION = 1
RECORD = b"TURN"
_PREFIX = struct.Struct("<4sQQ")  # magic, payload bytes, generation; then a u32 crc32 of them
_PREFIX_BYTES = _PREFIX.size + 4
_DIGEST = 16
_TURN = struct.Struct("<QQBB")  # seen_before, seen_after, has logits, ranges
_RANGE = struct.Struct("<II")


class FileChanged(ServingError):
    """Another writer changed a conversation's file since this journal last read or wrote it (it
    holds the conversation's lease now): this writer's turn is refused, the file left as it is."""

    kind = ErrorKind.CONVERSATION_BUSY


# ----------------------------------------------------------------- the adapter to the state's type
def state_fields(state: StreamState) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """A conversation's state as plain tensors: ``(keys, values)`` ``[layers, kv_heads, capacity,
    head_dim]``, the tokens it has seen, its newest logits ``[vocab]`` (None before any)."""
    return state.keys, state.values, state.seen, state.last_logits


def state_from(model, geometry: Geometry, fill: float, keys: torch.Tensor, values: torch.Tensor, seen: int,
               logits: torch.Tensor | None) -> StreamState:
    """The state :func:`state_fields` reads, from host tensors of the same shapes."""
    state = StreamState(model, geometry, fill)
    state.keys.copy_(keys)
    state.values.copy_(values)
    state.seen = seen
    state.last_logits = None if logits is None else logits.float().clone()
    return state


def keeps_own_store(state) -> bool:
    """Whether the state carries more than the cache (a recall block store): saved whole."""
    return getattr(state, "recall", None) is not None


# ----------------------------------------------------------------- format
def written_slots(geometry: Geometry, seen_before: int, seen_after: int) -> list[tuple[int, int]]:
    """Slot ranges ``[lo, hi)`` a turn of tokens ``seen_before .. seen_after - 1`` leaves changed:
    those of its tokens still held once all are stored (its sinks and its last W). At most 3."""
    s, w, c = geometry.sink_tokens, geometry.window, geometry.capacity
    ranges = []
    if seen_before < min(seen_after, s):
        ranges.append((seen_before, min(seen_after, s)))
    first = max(seen_before, s, seen_after - w)  # the turn's first ring token still held
    if first < seen_after:
        lo, n = geometry.slot(first), seen_after - first
        parts = [(lo, lo + n)] if lo + n <= c else [(lo, c), (s, s + lo + n - c)]
        for a, b in parts:
            if ranges and ranges[-1][1] == a:
                ranges[-1] = (ranges[-1][0], b)
            else:
                ranges.append((a, b))
    return ranges


def _digest(*parts) -> bytes:
    h = hashlib.blake2b(digest_size=_DIGEST)
    for p in parts:
        h.update(p)
    return h.digest()


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class _Tail:
    """What a conversation's file ends with: appends continue from here."""

    generation: int  # of the newest record (the base's when none)
    seen: int
    end: int  # bytes of the valid file
    log_bytes: int  # bytes of records after the base
    inode: int
    last_at: int | None = None  # offset of the newest record (None: folded into the base)


@dataclasses.dataclass
class _Replayed:
    keys: torch.Tensor  # [layers, kv_heads, capacity, head_dim] on the host
    values: torch.Tensor
    seen: int
    logits: torch.Tensor | None  # [vocab] float32
    geometry: Geometry
    fill: float
    generation: int
    end: int  # bytes of the valid file
    base_end: int
    torn: int  # bytes dropped after the last valid record
    last_at: int | None = None  # offset of the newest record (None: none after the base)


class _Layout:
    """The shapes of one model's files: cache ``[layers, kv_heads, capacity, head_dim]``, logits ``[vocab]``."""

    def __init__(self, model, geometry: Geometry):
        c = model.config
        self.model, self.geometry, self.dtype = model, geometry, model.dtype
        self.shape = (c.num_layers, c.num_kv_heads, geometry.capacity, c.head_dim)
        self.vocab = c.vocab_size
        self.item = torch.empty((), dtype=model.dtype).element_size()
        self.slot_bytes = c.num_layers * c.num_kv_heads * c.head_dim * self.item  # keys of one slot

    def header(self, fill: float, generation: int, seen: int, base: list[bytes], has_logits: bool) -> bytes:
        meta = {"format": FORMAT, "version": VERSION, "model": model_fingerprint(self.model),
                "model_shape": self.model.config.fingerprint(), "sink_tokens": self.geometry.sink_tokens,
                "window": self.geometry.window, "cache_fill": repr(float(fill)), "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape), "vocab": self.vocab,
                "base": {"generation": generation, "seen": seen, "logits": has_logits,
                         "bytes": sum(len(b) for b in base), "digest": _digest(*base).hex()}}
        body = json.dumps(meta, sort_keys=True).encode()
        head = MAGIC + struct.pack("<I", len(body)) + body
        return head + _digest(head)

    def base(self, keys, values, logits) -> list[bytes]:
        return [_raw(keys), _raw(values)] + ([] if logits is None else [_raw(logits.float())])

    def record(self, generation: int, keys, values, seen_before: int, seen_after: int, logits) -> bytes:
        ranges = written_slots(self.geometry, seen_before, seen_after)
        parts = [_TURN.pack(seen_before, seen_after, logits is not None, len(ranges))]
        parts += [_RANGE.pack(a, b) for a, b in ranges]
        parts += [_raw(t[:, :, a:b]) for t in (keys, values) for a, b in ranges]
        if logits is not None:
            parts.append(_raw(logits.float()))
        payload = b"".join(parts)
        prefix = _PREFIX.pack(RECORD, len(payload), generation)
        prefix += struct.pack("<I", zlib.crc32(prefix))
        return prefix + payload + _digest(prefix, payload)


def is_journal(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a journal file (False when it is missing or of another format)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except FileNotFoundError:
        return False


def _replay(data: bytearray, model, path) -> _Replayed:
    """The state a journal file holds (``data``: its bytes), every check of the module docstring applied."""
    def damaged(what):
        return UserError(f"{path}: {what}; the conversation's file is damaged and cannot be restored")

    mv = memoryview(data)
    if len(data) < len(MAGIC) + 4 + _DIGEST or bytes(data[: len(MAGIC)]) != MAGIC:
        raise damaged("not a complete streaming-trt journal header")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    head_end = len(MAGIC) + 4 + n
    if head_end + _DIGEST > len(data) or _digest(mv[:head_end]) != bytes(data[head_end : head_end + _DIGEST]):
        raise damaged("the header does not match its checksum")
    try:
        meta = json.loads(bytes(data[len(MAGIC) + 4 : head_end]))
    except ValueError:
        raise damaged("the header is not JSON") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a streaming-trt conversation journal")
    if meta.get("version") != VERSION:
        raise UserError(f"{path}: a journal of format version {meta.get('version')}, written by another version of "
                        f"streaming-trt; this one reads version {VERSION}, so the conversation must be started again")
    if meta.get("model") != model_fingerprint(model):
        raise UserError(f"{path}: saved for another model ({meta.get('model_shape')}, weights "
                        f"{str(meta.get('model'))[:12]}), but the loaded model is {model.config.fingerprint()}, "
                        f"weights {model_fingerprint(model)[:12]}")
    try:
        geometry = Geometry(meta["sink_tokens"], meta["window"])
        fill, base = float(meta["cache_fill"]), meta["base"]
        generation, seen, has_logits, base_bytes = (base[k] for k in ("generation", "seen", "logits", "bytes"))
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise damaged(f"the header lacks or mangles {e}") from None
    lay = _Layout(model, geometry)
    if (meta.get("dtype"), meta.get("shape"), meta.get("vocab")) != (_dtype_name(lay.dtype), list(lay.shape), lay.vocab):
        raise UserError(f"{path}: a cache of {meta.get('shape')} {meta.get('dtype')}, vocab {meta.get('vocab')}; "
                        f"the model needs {list(lay.shape)} {_dtype_name(lay.dtype)}, vocab {lay.vocab}")
    pos = head_end + _DIGEST
    cache_bytes = lay.shape[0] * lay.shape[1] * lay.shape[2] * lay.shape[3] * lay.item
    want = 0 if base_bytes == 0 else 2 * cache_bytes + (4 * lay.vocab if has_logits else 0)
    if (base_bytes != want or pos + base_bytes > len(data)
            or _digest(mv[pos : pos + base_bytes]).hex() != base["digest"]):
        raise damaged("the base snapshot is incomplete or does not match its checksum")

    def tensor(offset, shape, dtype):
        count = 1
        for d in shape:
            count *= d
        return torch.frombuffer(data, dtype=dtype, count=count, offset=offset).view(shape)

    if base_bytes:
        keys = tensor(pos, lay.shape, lay.dtype).clone()
        values = tensor(pos + cache_bytes, lay.shape, lay.dtype).clone()
        logits = tensor(pos + 2 * cache_bytes, (lay.vocab,), torch.float32).clone() if has_logits else None
    else:
        if seen != 0 or has_logits:
            raise damaged("an empty base that claims tokens")
        keys, values = (torch.full(lay.shape, fill, dtype=lay.dtype) for _ in range(2))
        logits = None
    pos += base_bytes
    base_end, last_at = pos, None
    while pos < len(data):
        if len(data) - pos < _PREFIX_BYTES or data[pos : pos + _PREFIX_BYTES] == bytes(_PREFIX_BYTES):
            break  # a prefix cut short, or zeros a crash left where a record was being written
        magic, size, gen = _PREFIX.unpack_from(data, pos)
        (crc,) = struct.unpack_from("<I", data, pos + _PREFIX.size)
        if magic != RECORD or crc != zlib.crc32(data[pos : pos + _PREFIX.size]):
            raise damaged(f"the turn record at byte {pos} has a damaged prefix")
        end = pos + _PREFIX_BYTES + size + _DIGEST
        if end > len(data):  # cut short by a crash while it was written
            break
        payload = mv[pos + _PREFIX_BYTES : end - _DIGEST]
        if _digest(mv[pos : pos + _PREFIX_BYTES], payload) != bytes(data[end - _DIGEST : end]):
            if end == len(data):  # the last one, never acknowledged: a torn write
                break
            raise damaged(f"the turn record at byte {pos} (generation {gen}) does not match its checksum, "
                          "and turns were recorded after it")
        if size < _TURN.size or size < _TURN.size + payload[_TURN.size - 1] * _RANGE.size:
            raise damaged(f"the turn record at byte {pos} is too short for its own fields")
        before, after, rec_logits, n_ranges = _TURN.unpack_from(payload, 0)
        ranges = [_RANGE.unpack_from(payload, _TURN.size + i * _RANGE.size) for i in range(n_ranges)]
        if (gen, before) != (generation + 1, seen) or after < before or ranges != written_slots(geometry, before, after):
            raise damaged(f"the turn record at byte {pos} (generation {gen}, tokens {before}..{after}) does not "
                          f"follow generation {generation} at {seen} tokens")
        slots = sum(b - a for a, b in ranges)
        expect = _TURN.size + n_ranges * _RANGE.size + 2 * slots * lay.slot_bytes + (4 * lay.vocab if rec_logits else 0)
        if size != expect:
            raise damaged(f"the turn record at byte {pos} has {size} payload bytes, its slots need {expect}")
        at = pos + _PREFIX_BYTES + _TURN.size + n_ranges * _RANGE.size
        for t in (keys, values):
            for a, b in ranges:
                shape = (lay.shape[0], lay.shape[1], b - a, lay.shape[3])
                t[:, :, a:b] = tensor(at, shape, lay.dtype)
                at += (b - a) * lay.slot_bytes
        if rec_logits:
            logits = tensor(at, (lay.vocab,), torch.float32).clone()
        generation, seen, last_at, pos = gen, after, pos, end
    if logits is not None and not bool(logits.isfinite().all()):
        raise damaged("the newest logits are not finite")
    return _Replayed(keys, values, seen, logits, geometry, fill, generation, pos, base_end, len(data) - pos, last_at)


def _generation_at(fd: int, offset: int, size: int) -> int | None:
    """The generation of a complete record at ``offset`` of a file of ``size`` bytes (its prefix
    checked, its length within the file), None when there is none (a torn or absent record)."""
    head = os.pread(fd, _PREFIX_BYTES, offset)
    if len(head) < _PREFIX_BYTES:
        return None
    magic, length, gen = _PREFIX.unpack_from(head, 0)
    (crc,) = struct.unpack_from("<I", head, _PREFIX.size)
    if magic != RECORD or crc != zlib.crc32(head[: _PREFIX.size]) or offset + _PREFIX_BYTES + length + _DIGEST > size:
        return None
    return gen


def _read(path: Path) -> tuple[bytearray, int]:
    """The file's bytes and its inode."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        return _read_upto(f, st.st_size), st.st_ino


def _read_upto(f, n: int) -> bytearray:
    """At most ``n`` bytes from ``f``'s position."""
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            break
        got += k
    del view
    return data if got == n else data[:got]


def read_file(path: str | os.PathLike, model):
    """The state saved in ``path``, whichever format (a journal, or a whole :meth:`StreamState.save`
    file); read-only: a torn last record is skipped, not cut off."""
    path = Path(path)
    if not is_journal(path):
        return StreamState.load(path, model)
    r = _replay(_read(path)[0], model, path)
    return state_from(model, r.geometry, r.fill, r.keys, r.values, r.seen, r.logits)


class _NewFile:
    """A file written beside ``path`` (``.<name>.<tag>``) and renamed over it on :meth:`commit`, so
    that a crash leaves the old or the new file whole (data fsynced before the rename, the rename
    before returning); mode 0600 from its first byte."""

    def __init__(self, path: Path, tag: str):
        self.path, self.tmp, self.size = path, path.with_name(f".{path.name}.{tag}"), 0
        self.tmp.unlink(missing_ok=True)  # a crash's leftover; a link planted there is not followed
        self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.fchmod(self.fd, 0o600)

    def write(self, data) -> None:
        _write_all(self.fd, data)
        self.size += len(data)

    def sync(self) -> None:
        os.fsync(self.fd)

    def commit(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        self.tmp.replace(self.path)
        _sync_dir(self.path.parent)

    def discard(self) -> None:
        """Remove the file unless committed."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.tmp.unlink(missing_ok=True)


def _write_new(path: Path, parts: list[bytes]) -> int:
    """Replace ``path`` by ``parts`` (:class:`_NewFile`); returns the bytes written."""
    new = _NewFile(path, "new")
    try:
        for p in parts:
            new.write(p)
        new.commit()
    finally:
        new.discard()
    return new.size


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The files of a store's conversations; thread-safe (one lock per conversation).

    Args:
        directory: where ``<id:020d>.session`` files live.
        model, geometry: every conversation's (a file of another geometry is refused).
        fill_value: value of never-written cache slots of a new conversation.
        compact_ratio: fold the records into a new base once they exceed this many times the bytes
            of the whole cache (1.0: each turn costs at most about twice its records, amortized).
        background: compact on a thread of its own (False: inside the append that triggers it).
        log: called with one line per torn record dropped and per compaction failure.
        guard: ``guard(cid)`` gives a context manager that holds conversation ``cid`` (its lease,
            :mod:`.lease`) while a background compaction rewrites its file, or raises when another
            worker holds it (the compaction is skipped; None: no guard, one writer per directory).

    Counters: ``appended`` (record bytes), ``compacted`` (bytes of rewritten files: new bases, and
    whole saves of recall sessions), ``compactions``.
    """

    def __init__(self, directory: str | os.PathLike, model, geometry: Geometry, fill_value: float = 0.0,
                 compact_ratio: float = 1.0, background: bool = True, log=lambda message: None, guard=None):
        if not compact_ratio > 0:
            raise UserError(f"compact_ratio must be > 0, got {compact_ratio!r}")
        self.dir, self.model, self.geometry, self.fill_value = Path(directory), model, geometry, fill_value
        self.compact_ratio, self.background, self.log, self.guard = compact_ratio, background, log, guard
        self.dir.mkdir(parents=True, exist_ok=True)
        self.layout = _Layout(model, geometry)
        self.snapshot_bytes = 2 * self.layout.slot_bytes * geometry.capacity + 4 * self.layout.vocab
        self.appended = self.compacted = self.compactions = 0
        self._tails: dict[int, _Tail] = {}
        self._stamps: dict[int, tuple[int, int, int]] = {}  # whole-state files: (inode, bytes, mtime ns)
        self._locks: dict[int, threading.RLock] = {}
        self._compacting: set[int] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def path(self, cid: int) -> Path:
        return session_path(self.dir, cid)

    def size(self, cid: int) -> int:
        """Bytes of conversation ``cid``'s file on disk (0 when it has none)."""
        try:
            return self.path(cid).stat().st_size
        except FileNotFoundError:
            return 0

    def _cid_lock(self, cid: int) -> threading.RLock:
        with self._lock:
            return self._locks.setdefault(cid, threading.RLock())

    # ------------------------------------------------------------- writing
    def save(self, cid: int, state) -> int:
        """Persist ``state``, conversation ``cid``'s newest (the store's save path): a turn record
        (:meth:`append`), or the whole file for a state with a store of its own. Returns bytes written."""
        if keeps_own_store(state):
            with self._cid_lock(cid):
                self._tails.pop(cid, None)
                state.save(self.path(cid))
                self._stamps[cid] = _stamp(os.stat(self.path(cid)))
                size = self.size(cid)
                self._count(compacted=size)
                return size
        return self.append(cid, state)

    def append(self, cid: int, state, seen_before: int | None = None) -> int:
        """Record the turn that took conversation ``cid`` from ``seen_before`` tokens (default: what
        its file holds; 0 for a new conversation) to ``state``; fsynced before returning (the turn
        may be acknowledged then). A conversation with a whole-state file gets a journal whose base
        is ``state``. Returns the bytes written."""
        keys, values, seen_after, logits = state_fields(state)
        path = self.path(cid)
        with self._cid_lock(cid):
            tail = self._tail(cid)
            if tail is None and path.exists():  # a whole-state file: the state is the new base
                written = _write_new(path, self._base_parts(keys, values, seen_after, logits, 0))
                self._tails[cid] = _Tail(0, seen_after, written, 0, path.stat().st_ino)
                self._stamps.pop(cid, None)
                self._count(compacted=written)
                return written
            have = 0 if tail is None else tail.seen
            if seen_before is not None and seen_before != have:
                raise ValueError(f"conversation {cid}: a turn from {seen_before} tokens, but its file holds {have}")
            if seen_after < have:
                raise ValueError(f"conversation {cid}: the state holds {seen_after} tokens, its file {have}")
            record = self.layout.record((0 if tail is None else tail.generation) + 1, keys, values, have, seen_after,
                                        logits)
            if tail is None:  # a new conversation: its base is the empty cache
                header = self.layout.header(self.fill_value, 0, 0, [], False)
                written = _write_new(path, [header, record])
                self._tails[cid] = _Tail(1, seen_after, written, len(record), path.stat().st_ino, len(header))
            else:
                self._append(cid, path, tail, record)
                written = len(record)
                tail.generation, tail.seen, tail.last_at = tail.generation + 1, seen_after, tail.end
                tail.end, tail.log_bytes = tail.end + len(record), tail.log_bytes + len(record)
            self._count(appended=written)
            grown = self._tails[cid].log_bytes > self.compact_ratio * self.snapshot_bytes
        if grown:
            self._compact_later(cid)
        return written

    @staticmethod
    def _append(cid: int, path: Path, tail: _Tail, record: bytes) -> None:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise FileChanged(f"conversation {cid}'s file was deleted by another worker; start it again") from None
        try:
            st = os.fstat(fd)
            changed = st.st_ino != tail.inode or st.st_size < tail.end
            if not changed and st.st_size > tail.end:  # another writer's turn, or a torn one of a crash
                changed = _generation_at(fd, tail.end, st.st_size) is not None
            if changed:  # the generation chain is another writer's now: leave it whole
                raise FileChanged(f"conversation {cid}'s file was changed by another worker after generation "
                                  f"{tail.generation}; retry the turn")
            if st.st_size != tail.end:
                os.ftruncate(fd, tail.end)
            os.lseek(fd, tail.end, os.SEEK_SET)
            try:
                _write_all(fd, record)
                os.fdatasync(fd)
            except OSError:
                os.ftruncate(fd, tail.end)  # leave no partial record behind a full disk
                raise
        finally:
            os.close(fd)

    def _tail(self, cid: int) -> _Tail | None:
        """Where conversation ``cid``'s journal ends (read from its file the first time); None
        when it has no journal file."""
        tail = self._tails.get(cid)
        if tail is None:
            path = self.path(cid)
            if not path.exists() or not is_journal(path):
                return None
            self._restore(cid)
            tail = self._tails[cid]
        return tail

    def _base_parts(self, keys, values, seen: int, logits, generation: int) -> list[bytes]:
        """Header and base of a file whose base is the given state, at ``generation``."""
        base = self.layout.base(keys, values, logits)
        return [self.layout.header(self.fill_value, generation, seen, base, logits is not None), *base]

    def _count(self, appended: int = 0, compacted: int = 0, compactions: int = 0) -> None:
        with self._lock:
            self.appended += appended
            self.compacted += compacted
            self.compactions += compactions

    # ------------------------------------------------------------- compaction
    def _compact_later(self, cid: int) -> None:
        with self._lock:
            if cid in self._compacting:
                return
            self._compacting.add(cid)
        if self.background:
            thread = threading.Thread(target=self._compact_job, args=(cid,), name=f"compact-{cid}", daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()
        else:
            self._compact_job(cid)

    def _compact_job(self, cid: int) -> None:
        try:
            if self.guard is None:
                self.compact(cid)
            else:
                with self.guard(cid):
                    self.compact(cid)
        except Exception as e:  # the records stay valid: the next append tries again
            self.log(f"conversation {cid}: compaction failed ({type(e).__name__}: {e}); its records are kept")
        finally:
            with self._lock:
                self._compacting.discard(cid)
                self._threads.discard(threading.current_thread())

    def join(self, timeout: float | None = None) -> None:
        """Wait for the background compactions in flight (benchmarks, tests)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    def compact(self, cid: int) -> int:
        """Fold conversation ``cid``'s records into a new base; appends go on meanwhile (records
        written during the compaction are carried over). Returns the bytes written (0: nothing to do)."""
        path = self.path(cid)
        with self._cid_lock(cid):
            tail = self._tail(cid)  # appends move this very object on; a new file gets a new one
            if tail is None or tail.log_bytes == 0:
                return 0
            f = open(path, "rb")
            upto = dataclasses.replace(tail)
        new = None
        try:
            r = _replay(_read_upto(f, upto.end), self.model, path)
            if (r.generation, r.end) != (upto.generation, upto.end):
                raise RuntimeError(f"{path}: the file ends at generation {r.generation}, the journal expected "
                                   f"{upto.generation}")
            new = _NewFile(path, "compact")
            for part in self._base_parts(r.keys, r.values, r.seen, r.logits, r.generation):
                new.write(part)
            new.sync()  # the bulk reaches the disk before the lock is taken
            with self._cid_lock(cid):
                if self._tails.get(cid) is not tail:  # deleted, reloaded or started again meanwhile
                    return 0
                st = os.stat(path)
                if (st.st_ino, st.st_size) != (tail.inode, tail.end):  # another writer's turns: keep them
                    raise FileChanged(f"{path} was changed by another worker during its compaction")
                f.seek(upto.end)
                extra = _read_upto(f, tail.end - upto.end)  # records appended meanwhile
                base_size = new.size
                new.write(extra)
                new.commit()
                last_at = None if tail.last_at is None or tail.last_at < upto.end else base_size + tail.last_at - upto.end
                self._tails[cid] = _Tail(tail.generation, tail.seen, new.size, len(extra), path.stat().st_ino, last_at)
            self._count(compacted=new.size, compactions=1)
            return new.size
        finally:
            f.close()
            if new is not None:
                new.discard()

    # ------------------------------------------------------------- reading, deleting
    def load(self, cid: int):
        """Conversation ``cid``'s newest saved state; ``UserError`` when its file is refused. A torn
        last record is cut off the file (with a log line): the turn before it is restored."""
        path = self.path(cid)
        with self._cid_lock(cid):
            if not is_journal(path):
                self._tails.pop(cid, None)
                stamp = _stamp(os.stat(path))
                state = StreamState.load(path, self.model)
                self._stamps[cid] = stamp
                return state
            r = self._restore(cid)
        return state_from(self.model, r.geometry, r.fill, r.keys, r.values, r.seen, r.logits)

    def _restore(self, cid: int) -> _Replayed:
        path = self.path(cid)
        data, inode = _read(path)
        r = _replay(data, self.model, path)
        if r.geometry != self.geometry:
            raise UserError(f"{path}: saved with {r.geometry.sink_tokens} sink tokens and a window of "
                            f"{r.geometry.window}; this server runs {self.geometry.sink_tokens} and "
                            f"{self.geometry.window}")
        if r.torn:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.ftruncate(fd, r.end)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.log(f"{path}: dropped a torn last turn record ({r.torn} bytes, never acknowledged); "
                     f"restored generation {r.generation} at {r.seen} tokens")
        self._tails[cid] = _Tail(r.generation, r.seen, r.end, r.end - r.base_end, inode, r.last_at)
        self._stamps.pop(cid, None)
        return r

    def current(self, cid: int) -> bool:
        """Whether conversation ``cid``'s file is still the one this journal last read or wrote: the
        same file and length, its newest record of the same generation (a whole-state file: the
        same file, length and time). False when another worker continued, compacted or deleted it,
        or when this journal has not read it."""
        path = self.path(cid)
        with self._cid_lock(cid):
            tail, stamp = self._tails.get(cid), self._stamps.get(cid)
            if tail is None and stamp is None:
                return False
            try:
                fd = os.open(path, os.O_RDONLY)  # an open revalidates NFS's cached attributes
            except FileNotFoundError:
                return False
            try:
                st = os.fstat(fd)
                if tail is None:
                    return _stamp(st) == stamp
                if (st.st_ino, st.st_size) != (tail.inode, tail.end):
                    return False
                return tail.last_at is None or _generation_at(fd, tail.last_at, st.st_size) == tail.generation
            finally:
                os.close(fd)

    def generation(self, cid: int) -> int | None:
        """The generation of the newest turn this journal knows of conversation ``cid`` (None: not a
        journal it has read or written)."""
        with self._cid_lock(cid):
            tail = self._tails.get(cid)
            return None if tail is None else tail.generation

    def forget(self, cid: int) -> None:
        """Drop what this journal knows of conversation ``cid``'s file (it is read again next time)."""
        with self._cid_lock(cid):
            self._tails.pop(cid, None)
            self._stamps.pop(cid, None)

    def delete(self, cid: int) -> None:
        """Remove conversation ``cid``'s file (a compaction in flight is abandoned)."""
        path = self.path(cid)
        with self._cid_lock(cid):
            self._tails.pop(cid, None)
            self._stamps.pop(cid, None)
            path.unlink(missing_ok=True)
            for tag in ("new", "compact"):  # what a crash mid-write left
                path.with_name(f".{path.name}.{tag}").unlink(missing_ok=True)
