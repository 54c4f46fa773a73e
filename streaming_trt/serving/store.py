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

Several servers may share one session directory (replicas, Dynamo workers; NFS too): a conversation
is continued, saved, ended or reaped only under its lease (:mod:`.lease`: :meth:`take` before a turn,
:meth:`release` after its save), so two servers never both continue it; a conversation another
server saved is found on disk (every lookup checks the file, not a list made at start-up); a copy in
host memory is used only while its file is still the one this server last wrote or read (the same
file, length and newest generation: :meth:`Journal.current`), else the file is read again; the disk
policy counts every file of the directory (listed again every ``rescan_seconds``) and never deletes
a conversation whose lease is held, by this server or another. Last-turn times are the files'
modification times, the same for every server.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from contextlib import contextmanager

from ..contract import UserError
from ..engine import StreamState
from .journal import SUFFIX, Journal
from .lease import LeaseHeld, Leases
from .protocol import ErrorKind, ServingError

# Files of a conversation beside its session file, deleted with it (ended, replaced or reaped): the
# gateway's map entry, the Dynamo worker's history record.
SIDECARS = (".history", ".dynamo")


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
        lease_ttl: seconds a conversation's lease outlives a server that died holding it.
        owner: this server's name in the leases (default ``host:pid``).
        rescan_seconds: the disk policy lists the directory again after this long (files other
            servers wrote count too).
    """

    def __init__(self, model, geometry, session_dir: str | os.PathLike, host_bytes: int,
                 disk_bytes: int | None = None, idle_ttl: float | None = None, fill_value: float = 0.0,
                 log=lambda message: None, lease_ttl: float = 10.0, owner: str | None = None,
                 rescan_seconds: float = 10.0):
        if host_bytes < 0 or (disk_bytes is not None and disk_bytes < 0) or (idle_ttl is not None and idle_ttl <= 0):
            raise UserError("the host and disk budgets must be >= 0 bytes and the idle TTL > 0 seconds")
        self.model, self.geometry, self.fill_value, self.log = model, geometry, fill_value, log
        self.host_bytes, self.disk_bytes, self.idle_ttl = host_bytes, disk_bytes, idle_ttl
        self.dir = Path(session_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)  # conversation ids are file names: no other user lists them
        self.leases = Leases(self.dir, lease_ttl, owner)
        self.journal = Journal(self.dir, model, geometry, fill_value, log=log, guard=self.holding)
        self.rescan_seconds, self.scanned = rescan_seconds, 0.0
        self.resident: OrderedDict[int, StreamState] = OrderedDict()
        self.unsaved: dict[int, StreamState] = {}   # put, not yet written: never dropped from memory
        self.files: dict[int, tuple[float, int]] = {}  # id -> (last turn time, bytes)
        self.lock = threading.RLock()
        self.loads = 0      # conversations restored from disk
        self.reaped = 0     # conversations deleted by the TTL or the disk budget
        self.stale = 0      # copies in host memory found older than their file (another server continued it)
        self.leftovers = 0  # temporary files a crash left, removed at start
        for path in self.dir.glob(f".*{SUFFIX}.*"):  # .<id>.session.new / .compact / .tmp
            try:
                cid = int(path.name[1:].split(".", 1)[0])
            except ValueError:
                cid = None
            if cid is not None and self.leases.holder(cid) is not None:
                continue  # another server is writing it now
            path.unlink(missing_ok=True)
            self.leftovers += 1
        if self.leftovers:
            log(f"removed {self.leftovers} temporary file(s) a crash left in {self.dir}")
        self._rescan()

    def _rescan(self) -> None:
        """List the directory's session files again (those other servers wrote, or deleted)."""
        found = {}
        for path in self.dir.glob(f"*{SUFFIX}"):
            try:
                st = path.stat()
                found[int(path.stem)] = (st.st_mtime, st.st_size)
            except (ValueError, OSError):
                continue
        with self.lock:
            self.files = found
            self.scanned = time.time()

    def _on_disk(self, cid: int) -> bool:
        """Whether conversation ``cid`` has a file now (looked up, not remembered); updates ``files``."""
        try:
            st = self.path(cid).stat()
        except FileNotFoundError:
            with self.lock:
                self.files.pop(cid, None)
            return False
        with self.lock:
            self.files[cid] = (st.st_mtime, st.st_size)
        return True

    def path(self, cid: int) -> Path:
        return self.journal.path(cid)

    def sidecar(self, cid: int, suffix: str) -> Path:
        """Conversation ``cid``'s file ``suffix`` (one of ``SIDECARS``) beside its session file."""
        if suffix not in SIDECARS:
            raise ValueError(f"{suffix!r} is not one of the store's sidecars {SIDECARS}")
        return self.path(cid).with_suffix(suffix)

    # ----------------------------------------------------------------- leases
    def take(self, cid: int) -> None:
        """Hold conversation ``cid`` for a turn (reentrant); raises :class:`~.lease.LeaseHeld`
        (``ErrorKind.CONVERSATION_BUSY``, retryable) while another server holds it."""
        self.leases.take(cid)

    def release(self, cid: int) -> None:
        """Let go of conversation ``cid`` (once per :meth:`take`), after its turn's save; the lease
        directory of a conversation that ended meanwhile (an END turn, a one-shot) goes too."""
        self.leases.release(cid)
        try:
            ended = not self.leases.holds(cid) and not self.exists(cid)
        except Exception:  # an unreadable directory: letting go must not fail (the directory stays)
            return
        if ended:
            self.leases.forget(cid)

    def renew(self, cid: int) -> None:
        """Push the expiry of the lease on ``cid`` ahead (a renewal thread does it every TTL/3)."""
        self.leases.renew(cid)

    @contextmanager
    def holding(self, cid: int):
        """``with store.holding(cid):`` the conversation's lease, taken and released."""
        self.leases.take(cid)
        try:
            yield
        finally:
            self.leases.release(cid)

    def close(self) -> None:
        self.leases.close()

    # ----------------------------------------------------------------- conversations
    def exists(self, cid: int) -> bool:
        with self.lock:
            if cid in self.unsaved:
                return True
        return self._on_disk(cid)

    def get(self, cid: int) -> StreamState:
        """The saved state of conversation ``cid`` (from memory while its file is unchanged, else
        loaded from the file). Files are read and checked outside the store's lock: another thread
        keeps using the store meanwhile (the caller holds the conversation's lease)."""
        with self.lock:
            if cid in self.unsaved:
                return self.unsaved[cid]
            state = self.resident.get(cid)
        if state is not None:
            if self.journal.current(cid):
                with self.lock:
                    if self.resident.get(cid) is state:
                        self.resident.move_to_end(cid)
                return state
            with self.lock:  # another server continued, compacted or ended it since
                if self.resident.get(cid) is state:
                    del self.resident[cid]
                self.stale += 1
            self.journal.forget(cid)
            self.log(f"conversation {cid}: the copy in memory is older than its file; reading the file")
        unknown = ServingError(f"conversation {cid} is unknown or has ended; start it with the START flag",
                               ErrorKind.UNKNOWN_CONVERSATION)
        if not self._on_disk(cid):
            raise unknown
        try:
            state = self.journal.load(cid)
        except FileNotFoundError:  # deleted by another server between the two looks
            with self.lock:
                self.files.pop(cid, None)
            raise unknown from None
        with self.lock:
            self.loads += 1
            self.resident[cid] = state
            self._fit_memory()
        self.log(f"conversation {cid} restored from {self.path(cid)}")
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
        with self.holding(cid):
            self.leases.check(cid)  # the fence: this server still holds it
            self.journal.save(cid, state)
            st = path.stat()
        with self.lock:
            if self.unsaved.get(cid) is state:
                del self.unsaved[cid]
            self.files[cid] = (st.st_mtime, st.st_size)
            self._fit_memory()
        self.reap(keep=in_use | {cid})

    def forget(self, cid: int) -> None:
        """Drop conversation ``cid`` from memory only (its file keeps the last saved turn)."""
        with self.lock:
            self.resident.pop(cid, None)
            self.unsaved.pop(cid, None)

    def end(self, cid: int) -> None:
        """Forget conversation ``cid`` everywhere (under its lease: :class:`~.lease.LeaseHeld` while
        another server holds it)."""
        with self.holding(cid):
            with self.lock:
                self.resident.pop(cid, None)
                self.unsaved.pop(cid, None)
                self.files.pop(cid, None)
            self.journal.delete(cid)
            for suffix in SIDECARS:
                self.sidecar(cid, suffix).unlink(missing_ok=True)
        self.leases.forget(cid)

    def reap(self, now: float | None = None, keep: set[int] = frozenset()) -> list[int]:
        """Apply the disk policy (module docstring); returns the ids deleted. ``keep``: ids in use.
        Never deletes a conversation whose lease is held (here: a turn in flight; elsewhere:
        another server is continuing it)."""
        if self.idle_ttl is None and self.disk_bytes is None:
            return []
        now = time.time() if now is None else now
        if now - self.scanned >= self.rescan_seconds or now < self.scanned:
            self._rescan()
        gone = []
        with self.lock:
            by_age = sorted(self.files.items(), key=lambda item: item[1][0])
        total = sum(size for _, (_, size) in by_age)
        for cid, (when, size) in by_age:  # file I/O outside the store's lock
            expired = self.idle_ttl is not None and now - when > self.idle_ttl
            over = self.disk_bytes is not None and total > self.disk_bytes
            if not (expired or over) or cid in keep or cid in self.unsaved or self.leases.holds(cid):
                continue
            try:
                with self.holding(cid):
                    st = self.path(cid).stat()
                    if st.st_mtime > when:  # another server saved a turn since the listing
                        with self.lock:
                            self.files[cid] = (st.st_mtime, st.st_size)
                        continue
                    self.end(cid)
            except LeaseHeld:  # another server is continuing it
                continue
            except FileNotFoundError:  # another server ended or reaped it
                with self.lock:
                    self.files.pop(cid, None)
                total -= size
                continue
            total -= size
            gone.append(cid)
        with self.lock:
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

