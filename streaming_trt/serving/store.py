"""One streaming Session per conversation: LRU-resident in memory, saved to disk after each turn."""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from ..errors import UserError


class ConversationStore:
    """Sessions keyed by conversation id (the Triton sequence correlation id, a uint64).

    At most ``max_resident`` sessions stay in memory; the least recently used are dropped from
    memory (their file on disk is current, since every turn ends with :meth:`save`) and loaded
    again on their next turn. A restarted process finds every conversation in ``session_dir``.
    """

    def __init__(self, model, sink_tokens: int, window: int, session_dir: str | os.PathLike, max_resident: int):
        if max_resident < 1:
            raise UserError(f"max_resident must be >= 1, got {max_resident}")
        self.model, self.sink_tokens, self.window = model, sink_tokens, window
        self.dir = Path(session_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_resident = max_resident
        self.resident: OrderedDict[int, object] = OrderedDict()
        self.loads = 0  # sessions restored from disk (evicted, or from an earlier process)

    def path(self, cid: int) -> Path:
        return self.dir / f"{int(cid):020d}.session"

    def exists(self, cid: int) -> bool:
        return cid in self.resident or self.path(cid).is_file()

    def start(self, cid: int):
        """A new, empty conversation ``cid`` (an earlier one with that id is discarded)."""
        from ..session import Session

        self.end(cid)
        session = Session(self.model, sink_tokens=self.sink_tokens, window=self.window)
        self._put(cid, session)
        return session

    def get(self, cid: int):
        """The session of conversation ``cid``, loaded from disk if it is not resident."""
        from ..session import Session

        if cid in self.resident:
            self.resident.move_to_end(cid)
            return self.resident[cid]
        path = self.path(cid)
        if not path.is_file():
            raise UserError(f"conversation {cid} is unknown or has ended; start it with the START flag")
        session = Session.load(path, self.model)
        self.loads += 1
        self._put(cid, session)
        return session

    def save(self, cid: int) -> None:
        """Write conversation ``cid`` to its file atomically (Session.save writes a temporary file
        and renames it), so a killed process leaves either the previous or the new turn."""
        self.resident[cid].save(self.path(cid))

    def end(self, cid: int) -> None:
        self.resident.pop(cid, None)
        self.path(cid).unlink(missing_ok=True)

    def _put(self, cid: int, session) -> None:
        self.resident[cid] = session
        self.resident.move_to_end(cid)
        while len(self.resident) > self.max_resident:
            old, session = self.resident.popitem(last=False)
            if not self.path(old).is_file():  # a turn that failed before its save: keep its state
                session.save(self.path(old))

    def forget(self, cid: int) -> None:
        """Drop ``cid`` from memory without saving (its file keeps the last completed turn)."""
        self.resident.pop(cid, None)
