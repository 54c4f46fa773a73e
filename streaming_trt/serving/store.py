"""Where conversations wait between turns: host memory up to a byte budget, then disk.

Every finished turn is saved to ``session_dir`` (one file per conversation: a base snapshot plus
fsynced turn records, :mod:`.journal`) before its final response goes out, so a restarted server
finds every conversation there.
Host memory keeps the most recently used conversations, as
:class:`~streaming_trt.engine.StreamState` values, up to ``host_bytes``;
the least recently used beyond that are dropped from memory (their file is current) and loaded
again on their next turn.

Disk policy: a conversation whose last turn is older than ``idle_ttl`` seconds is deleted, and when
the files together exceed ``disk_bytes`` the least recently used are deleted first until they fit.
A deleted conversation's next turn is refused as unknown (the client starts it again).
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ..contract import UserError
from ..engine import StreamState
from .journal import SUFFIX, Journal


class ConversationStore:
    """Conversations keyed by id (the Triton sequence correlation id, a uint64); thread-safe.

    Args:
        model: the served model.
        geometry: every conversation's cache geometry.
        session_dir: where the files live (created).
        host_bytes: budget of idle conversations kept in memory.
        disk_bytes: budget of the files (None: unbounded).
        idle_ttl: seconds after its last turn a conversation is deleted (None: never).
        fill_value: value of never-written cache slots (tests use NaN).
        log: called with one line per conversation restored from disk or reaped.
    """

    def __init__(self, model, geometry, session_dir: str | os.PathLike, host_bytes: int,
                 disk_bytes: int | None = None, idle_ttl: float | None = None, fill_value: float = 0.0,
                 log=lambda message: None):
        if host_bytes < 0 or (disk_bytes is not None and disk_bytes < 0) or (idle_ttl is not None and idle_ttl <= 0):
            raise UserError("the host and disk budgets must be >= 0 bytes and the idle TTL > 0 seconds")
        self.model, self.geometry, self.fill_value, self.log = model, geometry, fill_value, log
        self.host_bytes, self.disk_bytes, self.idle_ttl = host_bytes, disk_bytes, idle_ttl
        self.dir = Path(session_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)  # conversation ids are file names: no other user lists them
        self.journal = Journal(self.dir, model, geometry, fill_value, log=log)
        self.resident: OrderedDict[int, StreamState] = OrderedDict()
        self.unsaved: dict[int, StreamState] = {}   # put, not yet written: never dropped from memory
        self.files: dict[int, tuple[float, int]] = {}  # id -> (last turn time, bytes)
        self.lock = threading.RLock()
        self.loads = 0      # conversations restored from disk
        self.reaped = 0     # conversations deleted by the TTL or the disk budget
        self.leftovers = 0  # temporary files a crash left, removed at start
        for path in self.dir.glob(f".*{SUFFIX}.*"):  # .<id>.session.new / .compact / .tmp
            path.unlink(missing_ok=True)
            self.leftovers += 1
        if self.leftovers:
            log(f"removed {self.leftovers} temporary file(s) a crash left in {self.dir}")
        for path in self.dir.glob(f"*{SUFFIX}"):
            try:
                st = path.stat()
                self.files[int(path.stem)] = (st.st_mtime, st.st_size)
            except (ValueError, OSError):
                continue

    def path(self, cid: int) -> Path:
        return self.journal.path(cid)

    def exists(self, cid: int) -> bool:
        with self.lock:
            return cid in self.resident or cid in self.unsaved or cid in self.files

    def get(self, cid: int) -> StreamState:
        """The saved state of conversation ``cid`` (from memory, or loaded from its file)."""
        with self.lock:
            if cid in self.unsaved:
                return self.unsaved[cid]
            if cid in self.resident:
                self.resident.move_to_end(cid)
                return self.resident[cid]
            if cid not in self.files:
                raise UserError(f"conversation {cid} is unknown or has ended; start it with the START flag")
            state = self.journal.load(cid)
            self.loads += 1
            self.log(f"conversation {cid} restored from {self.path(cid)}")
            self.resident[cid] = state
            self._fit_memory()
            return state

    def seen(self, cid: int) -> int:
        return self.get(cid).seen

    def holder(self, cid: int) -> StreamState | None:
        """Conversation ``cid``'s state in memory, whose memory its new state may reuse (None when not resident)."""
        with self.lock:
            return self.unsaved.get(cid) or self.resident.get(cid)

    def put(self, cid: int, state: StreamState) -> None:
        """``state`` is conversation ``cid``'s newest state; :meth:`save` writes it."""
        with self.lock:
            self.unsaved[cid] = state
            self.resident[cid] = state
            self.resident.move_to_end(cid)
            self._fit_memory()

    def save(self, cid: int, in_use: frozenset[int] = frozenset()) -> None:
        """Write conversation ``cid``'s newest state to its file (atomically; see StreamState.save),
        then apply the disk policy to the others, never to ``in_use`` (conversations with a turn in flight)."""
        with self.lock:
            state = self.unsaved.get(cid) or self.resident.get(cid)
        if state is None:
            raise UserError(f"conversation {cid} has no state to save")
        path = self.path(cid)
        self.journal.save(cid, state)
        with self.lock:
            if self.unsaved.get(cid) is state:
                del self.unsaved[cid]
            self.files[cid] = (time.time(), path.stat().st_size)
            self._fit_memory()
        self.reap(keep=in_use | {cid})

    def forget(self, cid: int) -> None:
        """Drop conversation ``cid`` from memory only (its file keeps the last saved turn)."""
        with self.lock:
            self.resident.pop(cid, None)
            self.unsaved.pop(cid, None)

    def end(self, cid: int) -> None:
        """Forget conversation ``cid`` everywhere."""
        with self.lock:
            self.resident.pop(cid, None)
            self.unsaved.pop(cid, None)
            self.files.pop(cid, None)
            self.journal.delete(cid)

    def reap(self, now: float | None = None, keep: set[int] = frozenset()) -> list[int]:
        """Apply the disk policy (module docstring); returns the ids deleted. ``keep``: ids in use."""
        now = time.time() if now is None else now
        gone = []
        with self.lock:
            by_age = sorted(self.files.items(), key=lambda item: item[1][0])
            total = sum(size for _, (_, size) in by_age)
            for cid, (when, size) in by_age:
                expired = self.idle_ttl is not None and now - when > self.idle_ttl
                over = self.disk_bytes is not None and total > self.disk_bytes
                if not (expired or over) or cid in keep or cid in self.unsaved:
                    continue
                self.end(cid)
                total -= size
                gone.append(cid)
            self.reaped += len(gone)
        if gone:
            self.log(f"{len(gone)} idle conversations deleted by the disk policy: {gone[:8]}")
        return gone

    def resident_bytes(self) -> int:
        with self.lock:
            return sum(s.nbytes() for s in self.resident.values())

    def _fit_memory(self) -> None:
        total = sum(s.nbytes() for s in self.resident.values())
        for cid in list(self.resident):
            if total <= self.host_bytes:
                return
            if cid in self.unsaved:
                continue
            total -= self.resident.pop(cid).nbytes()

