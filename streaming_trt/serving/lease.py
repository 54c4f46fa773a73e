"""Ownership leases of conversations in a session directory that several servers share (NFS too).

A worker continues a conversation only while it holds the conversation's lease, so two workers
never both continue one conversation, even when a router sends them the same session at once.
Leases use only operations that are atomic on NFS: an exclusive create (``O_CREAT | O_EXCL``),
``unlink`` and reading a small directory; never ``flock``/``fcntl`` locks.

Layout: ``<session_dir>/leases/<id:020d>/<epoch>``, one file per holding, holding the holder's
random token (``owner/nonce``). The lease is the file of the highest epoch; its modification time
plus ``ttl`` is when it expires (renewing touches it). Taking:

- no file: create epoch 1 exclusively (of two takers, one creates it, the other is refused);
- the highest epoch is live and not ours: refused (:class:`LeaseHeld`);
- it expired (its holder died or hung), or its holder is a process of this machine (the same
  host name and PID namespace) that no longer runs (a server restarted after a crash takes its
  conversations back at once): create epoch E+1 exclusively, then remove the older ones.

A holder checks (:meth:`Leases.check`) before every write that its file is still there, still
holds its token and no higher epoch exists: a holder that hung past its TTL finds its lease taken
(fencing; the session file's generation chain is the second fence, :mod:`.journal`).
Expiry compares the file's time (the file server's clock on NFS) with this machine's clock: keep
clocks synchronised (NTP) and the TTL far above their skew.
"""
from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path

from .protocol import ErrorKind, ServingError

DIR_NAME = "leases"


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    except OSError:
        return "?"


def _dead_here(token: bytes) -> bool:
    """Whether a lease's holder was a process of this machine and PID namespace that has exited."""
    try:
        host, pid, namespace = token.decode().split("/")[0].split(":")
        pid = int(pid)
    except ValueError:  # being written, or another owner format: not known dead
        return False
    if host != socket.gethostname() or namespace != _pid_namespace() or namespace == "?" or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class LeaseHeld(ServingError):
    """Another worker holds the conversation's lease: retry in a moment (it may be finishing a turn,
    or it died and its lease expires after the TTL)."""

    kind = ErrorKind.CONVERSATION_BUSY


class Leases:
    """This process's leases on conversations of ``directory`` (thread-safe; reentrant per id: a
    conversation taken twice is released after two :meth:`release` calls).

    Args:
        directory: the session directory (``leases/`` is made inside).
        ttl: seconds a lease lasts without renewal; a renewal thread touches every held lease
            every ``ttl / 3`` seconds.
        owner: a name for logs (default ``host:pid``); a random nonce makes each holding unique.
        clock: wall-clock seconds (tests move it).

    ``alive``: a callable the renewal thread asks before renewing (default: always); a server sets
    it to "my scheduler's loop went round lately", so a server whose work hangs (blocked on a dead
    peer) stops renewing and its conversations are taken over after the TTL.
    """

    def __init__(self, directory: str | os.PathLike, ttl: float = 10.0, owner: str | None = None,
                 clock=time.time, renew: bool = True):
        if not ttl > 0:
            raise ValueError(f"the lease TTL must be > 0 seconds, got {ttl!r}")
        self.root = Path(directory) / DIR_NAME
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ttl, self.clock = ttl, clock
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{_pid_namespace()}"
        self.held: dict[int, tuple[int, bytes, int]] = {}  # id -> (epoch, token, holds)
        self.lock = threading.Lock()
        self.taking = threading.Lock()
        self.stopped = threading.Event()
        self.alive = lambda: True
        self.thread = None
        if renew:
            self.thread = threading.Thread(target=self._renew_loop, name="streaming-trt-leases", daemon=True)
            self.thread.start()

    def _dir(self, cid: int) -> Path:
        return self.root / f"{int(cid):020d}"

    def _epochs(self, cid: int) -> list[int]:
        try:
            names = os.listdir(self._dir(cid))
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def _read(self, cid: int, epoch: int) -> tuple[bytes, float] | None:
        """(token, expiry time) of a holding; None when it is gone."""
        path = self._dir(cid) / str(epoch)
        try:
            with open(path, "rb") as f:
                expires = os.fstat(f.fileno()).st_mtime + self.ttl
                return f.read(256), expires
        except FileNotFoundError:
            return None

    def holder(self, cid: int) -> str | None:
        """Who holds conversation ``cid``'s live lease (``owner/nonce``; "" while being written), None if nobody."""
        for epoch in reversed(self._epochs(cid)):
            got = self._read(cid, epoch)
            if got is None:
                continue
            token, expires = got
            return token.decode(errors="replace") if expires > self.clock() else None
        return None

    def take(self, cid: int) -> None:
        """Hold conversation ``cid``; raises :class:`LeaseHeld` when another worker holds it."""
        with self.taking:  # two threads of this worker (a save, a background compaction): one creates, one counts
            self._take(cid)

    def _take(self, cid: int) -> None:
        with self.lock:
            if cid in self.held:
                epoch, token, holds = self.held[cid]
                self.held[cid] = (epoch, token, holds + 1)
                return
        for _ in range(8):  # a directory removed under us by a release: try again
            epochs = self._epochs(cid)
            top = epochs[-1] if epochs else 0
            if top:
                got = self._read(cid, top)
                if got is None:
                    continue
                token, expires = got
                if expires > self.clock() and not _dead_here(token):
                    who = token.decode(errors="replace").split("/")[0].rsplit(":", 1)[0] or "another worker"
                    raise LeaseHeld(f"conversation {cid} is being continued by {who}; retry in a moment "
                                    f"(a lease of a worker that died expires within {self.ttl:.0f} s)")
            token = f"{self.owner}/{secrets.token_hex(8)}".encode()
            directory = self._dir(cid)
            directory.mkdir(exist_ok=True, mode=0o700)
            try:
                fd = os.open(directory / str(top + 1), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:  # another taker was first
                raise LeaseHeld(f"conversation {cid} was just taken by another worker; retry in a moment") from None
            except FileNotFoundError:  # its directory was removed by a release meanwhile
                continue
            try:
                os.write(fd, token)
                now = self.clock()
                os.utime(fd, (now, now))  # expiry on the clock every holder compares with
            finally:  # no fsync: a lease lost in a crash of the machine is a lease of a dead holder

                os.close(fd)
            for old in epochs:  # expired holdings
                (directory / str(old)).unlink(missing_ok=True)
            if self._epochs(cid)[-1:] != [top + 1]:  # someone took a newer epoch meanwhile
                (directory / str(top + 1)).unlink(missing_ok=True)
                raise LeaseHeld(f"conversation {cid} was just taken by another worker; retry in a moment")
            with self.lock:
                self.held[cid] = (top + 1, token, 1)
            return
        raise LeaseHeld(f"conversation {cid}'s lease keeps changing hands; retry in a moment")

    def holds(self, cid: int) -> bool:
        with self.lock:
            return cid in self.held

    def check(self, cid: int) -> None:
        """Raise :class:`LeaseHeld` unless this process still holds ``cid``'s lease (the fence
        before a write): its file is there with its token, no newer epoch, not expired."""
        with self.lock:
            held = self.held.get(cid)
        if held is None:
            raise LeaseHeld(f"conversation {cid} is not held by this worker; retry the turn")
        epoch, token, _ = held
        got = self._read(cid, epoch)
        if got is None or got[0] != token or self._epochs(cid)[-1:] != [epoch] or got[1] <= self.clock():
            with self.lock:
                if self.held.get(cid, (None,))[0] == epoch:
                    del self.held[cid]
            raise LeaseHeld(f"conversation {cid}'s lease expired and another worker took it over; retry the turn")

    def renew(self, cid: int) -> None:
        """Push the expiry of ``cid``'s lease ``ttl`` seconds ahead (the renewal thread does this)."""
        with self.lock:
            held = self.held.get(cid)
        if held is not None:
            now = self.clock()
            try:
                os.utime(self._dir(cid) / str(held[0]), (now, now))
            except FileNotFoundError:  # taken over: check() reports it
                pass

    def release(self, cid: int) -> None:
        """Let go of ``cid`` (after as many calls as :meth:`take`); its file is removed if still ours."""
        with self.lock:
            held = self.held.get(cid)
            if held is None:
                return
            epoch, token, holds = held
            if holds > 1:
                self.held[cid] = (epoch, token, holds - 1)
                return
            del self.held[cid]
        got = self._read(cid, epoch)
        if got is not None and got[0] == token:
            (self._dir(cid) / str(epoch)).unlink(missing_ok=True)

    def forget(self, cid: int) -> None:
        """Remove conversation ``cid``'s lease directory if no holding is in it (the conversation
        ended; its next turn makes it again)."""
        try:
            self._dir(cid).rmdir()
        except OSError:  # not empty (a holder or taker is in it) or gone
            pass

    def _renew_loop(self) -> None:
        while not self.stopped.wait(self.ttl / 3):
            if not self.alive():  # hung: let the leases expire
                continue
            with self.lock:
                ids = list(self.held)
            for cid in ids:
                self.renew(cid)

    def close(self) -> None:
        self.stopped.set()
