"""The OpenAI gateway's map from a message history to the server conversation that holds it.

OpenAI clients resend the whole message list every turn. After a turn, the gateway records the
history it now holds (the messages plus the reply, as sent) under the conversation's id; a request
whose messages extend a recorded history by one user message continues that conversation and feeds
only the new message. The map lives in SQLite beside the sessions (``openai-conversations.sqlite``
in the session directory), so it survives restarts.

Every row is in one of three states:

- ``idle``: the conversation holds ``key`` (the SHA-256 of its history) and waits for its next turn;
  several rows may share a key (two users who sent the same first message): each takes one;
- ``busy``: a turn is in flight (taken from ``idle`` or new); the turn puts it back or drops it;
- ``ending``: to be ended on the server (a dropped turn, an idle conversation past the TTL or beyond
  the count limit, a ``busy`` row left by a process that died): :meth:`Conversations.reap` ends each
  with the ``end`` callback and deletes the row once the server has forgotten it.

Orphans (conversations on the server that no future request could continue) are thereby reaped:
a turn the client left mid-stream, a turn that failed or timed out, a history recorded twice, and
conversations left busy by a crash.

Turns are idempotent: each idle row also keeps its last turn (``asked``: the key of that request's
messages, ``idem``: its ``Idempotency-Key`` if it had one, ``reply``: what it answered), so a
resent turn gets the recorded reply instead of being fed again (:meth:`Conversations.answered`).
Turns in flight are known by their request's key (:meth:`Conversations.begin`): a resend of one,
or a continuation of its reply sent before it finished, waits for it instead of forking the
conversation (:meth:`Conversations.take` with ``wait``).
The map is one server's (a replica's): keep its file on a local disk, never on the session
directory several replicas share (SQLite's locks are not safe on NFS, and a replica starting up
ends the conversations its map left ``busy``, which must be its own only). Conversations a client
names with an ``X-Session-ID`` header are not in this map: :class:`SessionKeys` keeps what each
one holds beside its session file, where every replica finds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

FILE_NAME = "openai-conversations.sqlite"


def conversation_key(messages: list[dict]) -> str:
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def session_conversation(session_id: str) -> int:
    """The server conversation id of a client's ``X-Session-ID`` (the same on every replica; a
    63-bit hash, apart from the map's random ids only by chance of 1 in 2**63)."""
    digest = hashlib.sha256(b"streaming-trt X-Session-ID\0" + session_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1 or 1


class SessionKeys:
    """What each ``X-Session-ID`` conversation holds: the :func:`conversation_key` of its history,
    in ``<directory>/<id:020d>.history`` beside its session file (written whole by a rename; the
    session store deletes it with the conversation), or in memory when ``directory`` is None.

    A request whose messages before the last are the recorded history continues the conversation;
    any other history (edited, truncated, regenerated, or none recorded) starts it again from the
    whole history.
    """

    def __init__(self, directory: str | Path | None):
        self.dir = None if directory is None else Path(directory)
        self.memory: dict[int, str] = {}
        self.lock = threading.Lock()

    def path(self, cid: int) -> Path:
        return self.dir / f"{int(cid):020d}.history"

    def get(self, cid: int) -> str | None:
        if self.dir is None:
            with self.lock:
                return self.memory.get(cid)
        try:
            text = self.path(cid).read_text()
        except FileNotFoundError:
            return None
        return text.strip() or None

    def put(self, cid: int, messages: list[dict]) -> None:
        key = conversation_key(messages)
        if self.dir is None:
            with self.lock:
                self.memory[cid] = key
            return
        path = self.path(cid)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, key.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def drop(self, cid: int) -> None:
        """Forget what ``cid`` holds: its next request starts it again from the whole history."""
        if self.dir is None:
            with self.lock:
                self.memory.pop(cid, None)
            return
        self.path(cid).unlink(missing_ok=True)


class Conversations:
    """Message-history hash -> conversation ids, persisted; bounded by count and idle time.

    ``end(cid)`` ends a conversation on the server; it returns normally when the server has
    forgotten it (ended now, or unknown already) and raises when the server cannot be reached
    (the row stays ``ending`` and is tried again at the next :meth:`reap`).
    """

    def __init__(self, path: str | Path | None, end: Callable[[int], None], limit: int = 4096,
                 ttl: float = 24 * 3600.0, busy_limit: float = 6 * 3600.0, clock: Callable[[], float] = time.time):
        self.end, self.limit, self.ttl, self.busy_limit, self.clock = end, limit, ttl, busy_limit, clock
        self.lock = threading.Lock()
        self.settled = threading.Condition(self.lock)  # notified whenever a turn in flight ends
        self.running: dict[str, int] = {}  # request key / "idem:" + Idempotency-Key -> cid, turns in flight
        if path is not None and not Path(path).exists():  # the histories' hashes only, but still private
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.db = sqlite3.connect(":memory:" if path is None else str(path), check_same_thread=False,
                                  isolation_level=None)
        with self.lock:
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.execute("CREATE TABLE IF NOT EXISTS conversations (cid INTEGER PRIMARY KEY, key TEXT, "
                            "state TEXT NOT NULL, used REAL NOT NULL)")
            self.db.execute("CREATE INDEX IF NOT EXISTS by_key ON conversations (key, used)")
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(conversations)")}
            for column in ("asked", "idem", "reply"):  # a map written before turns were idempotent
                if column not in columns:
                    self.db.execute(f"ALTER TABLE conversations ADD COLUMN {column} TEXT")
            self.db.execute("CREATE INDEX IF NOT EXISTS by_asked ON conversations (asked)")
            self.db.execute("CREATE INDEX IF NOT EXISTS by_idem ON conversations (idem)")
            # A turn in flight when the previous process stopped left its conversation half-answered.
            self.db.execute("UPDATE conversations SET state = 'ending' WHERE state = 'busy'")

    def new(self) -> int:
        """A fresh conversation id (from ``secrets``), recorded busy."""
        with self.lock:
            while True:
                cid = secrets.randbits(63) or 1
                try:
                    self.db.execute("INSERT INTO conversations (cid, key, state, used) VALUES (?, NULL, 'busy', ?)",
                                    (cid, self.clock()))
                    return cid
                except sqlite3.IntegrityError:  # taken already (1 in 2**63)
                    continue

    def begin(self, cid: int, request: list[dict], idem: str | None = None) -> None:
        """A turn of ``cid`` for the messages ``request`` (Idempotency-Key ``idem``) is in flight
        until :meth:`put` or :meth:`drop`."""
        with self.lock:
            self.running[conversation_key(request)] = cid
            if idem is not None:
                self.running["idem:" + idem] = cid

    def _settle(self, cid: int) -> None:
        for name in [name for name, running in self.running.items() if running == cid]:
            del self.running[name]
        self.settled.notify_all()

    def _wait_for(self, name: str, deadline: float) -> None:
        """Wait (holding the lock) until no turn in flight is known as ``name``, or until ``deadline``."""
        while name in self.running:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.settled.wait(left)

    def take(self, messages: list[dict], wait: float = 0.0) -> int | None:
        """The most recently used idle conversation holding ``messages``, now busy; None if there is none.

        ``messages`` ending with a reply of a turn still in flight (the client sent its next message
        before the turn had finished): wait up to ``wait`` seconds for that turn, then take."""
        key = conversation_key(messages)
        deadline = time.monotonic() + wait
        with self.lock:
            if wait > 0 and len(messages) > 1 and messages[-1].get("role") == "assistant":
                self._wait_for(conversation_key(messages[:-1]), deadline)
            row = self.db.execute("SELECT cid FROM conversations WHERE key = ? AND state = 'idle' "
                                  "ORDER BY used DESC LIMIT 1", (key,)).fetchone()
            if row is None:
                return None
            self.db.execute("UPDATE conversations SET key = NULL, state = 'busy', used = ? WHERE cid = ?",
                            (self.clock(), row[0]))
            return row[0]

    def answered(self, request: list[dict], idem: str | None = None, wait: float = 0.0) -> tuple[int, dict] | None:
        """``(cid, reply)`` when this request was answered already (a resend), else None.

        With ``idem`` (an ``Idempotency-Key``): the turn sent with that key, if its messages are the
        same (other messages: :class:`ValueError`). Without: a continuation (``request`` holds a
        reply) equal to a conversation's last turn; a first message is never taken for a resend
        (two users may say the same). A resend of a turn still in flight waits for it (``wait`` s)."""
        key = conversation_key(request)
        if idem is None and len(request) < 2:
            return None
        deadline = time.monotonic() + wait
        with self.lock:
            self._wait_for(key if idem is None else "idem:" + idem, deadline)
            if idem is not None:
                row = self.db.execute("SELECT cid, asked, reply FROM conversations WHERE idem = ? AND state = 'idle' "
                                      "ORDER BY used DESC LIMIT 1", (idem,)).fetchone()
                if row is not None and row[1] != key:
                    raise ValueError(f"the Idempotency-Key {idem!r} was sent before with other messages; "
                                     "send a new key for a new turn")
            else:
                row = self.db.execute("SELECT cid, asked, reply FROM conversations WHERE asked = ? AND state = 'idle' "
                                      "ORDER BY used DESC LIMIT 1", (key,)).fetchone()
            if row is None or row[2] is None:
                return None
            self.db.execute("UPDATE conversations SET used = ? WHERE cid = ?", (self.clock(), row[0]))
            return row[0], json.loads(row[2])

    def put(self, messages: list[dict], cid: int, request: list[dict] | None = None, reply: dict | None = None,
            idem: str | None = None) -> None:
        """The turn of ``cid`` succeeded: it now holds ``messages`` (the reply included); ``request``
        and ``reply`` (JSON-able) are that turn's, kept for a resend (None: keep the previous turn's,
        the turn was refused unrun)."""
        asked = None if request is None else conversation_key(request)
        answer = None if reply is None else json.dumps(reply, ensure_ascii=False)
        with self.lock:
            self.db.execute("INSERT INTO conversations (cid, key, state, used, asked, idem, reply) "
                            "VALUES (?, ?, 'idle', ?, ?, ?, ?) ON CONFLICT (cid) DO UPDATE SET key = excluded.key, "
                            "state = 'idle', used = excluded.used, asked = coalesce(excluded.asked, asked), "
                            "idem = CASE WHEN excluded.asked IS NULL THEN idem ELSE excluded.idem END, "
                            "reply = coalesce(excluded.reply, reply)",
                            (cid, conversation_key(messages), self.clock(), asked, idem, answer))
            self._settle(cid)

    def drop(self, cid: int, on_server: bool = True) -> None:
        """The turn of ``cid`` failed or was left: end it on the server (at the next reap), or only
        forget it when the server does not have it."""
        with self.lock:
            if on_server:
                self.db.execute("UPDATE conversations SET key = NULL, state = 'ending' WHERE cid = ?", (cid,))
            else:
                self.db.execute("DELETE FROM conversations WHERE cid = ?", (cid,))
            self._settle(cid)

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.db.execute("SELECT state, COUNT(*) FROM conversations GROUP BY state").fetchall())

    def reap(self) -> int:
        """Mark what is past the TTL, beyond the limit or busy for too long as ``ending``, then end every
        ``ending`` conversation on the server. Returns how many were ended."""
        now = self.clock()
        with self.lock:
            db = self.db
            db.execute("UPDATE conversations SET key = NULL, state = 'ending' WHERE "
                       "(state = 'idle' AND used < ?) OR (state = 'busy' AND used < ?)",
                       (now - self.ttl, now - self.busy_limit))
            db.execute("UPDATE conversations SET key = NULL, state = 'ending' WHERE cid IN (SELECT cid FROM "
                       "conversations WHERE state = 'idle' ORDER BY used DESC LIMIT -1 OFFSET ?)", (self.limit,))
            doomed = [row[0] for row in db.execute("SELECT cid FROM conversations WHERE state = 'ending'")]
        ended = 0
        for cid in doomed:
            try:
                self.end(cid)
            except Exception:  # the server is away: try again at the next reap
                continue
            with self.lock:
                self.db.execute("DELETE FROM conversations WHERE cid = ? AND state = 'ending'", (cid,))
            ended += 1
        return ended

    def close(self) -> None:
        with self.lock:
            self.db.close()


class Reaper:
    """Calls ``conversations.reap()`` every ``interval`` seconds and whenever :meth:`wake` is called."""

    def __init__(self, conversations: Conversations, interval: float):
        self.conversations, self.interval = conversations, interval
        self.event, self.stopped = threading.Event(), False
        self.thread = threading.Thread(target=self._run, name="openai-conversation-reaper", daemon=True)

    def start(self) -> "Reaper":
        self.thread.start()
        return self

    def wake(self) -> None:
        self.event.set()

    def _run(self) -> None:
        while not self.stopped:
            try:
                self.conversations.reap()
            except Exception:  # a closed database at shutdown; nothing else is expected
                pass
            self.event.wait(self.interval)
            self.event.clear()

    def stop(self) -> None:
        self.stopped = True
        self.event.set()
        self.thread.join(10)
