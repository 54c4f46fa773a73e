"""Output paths checked before any work: one home for the reasons a path cannot be written."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..contract import UserError


def check_parent_writable(path: Path, label: str, verb: str = "written") -> Path:
    """The folder that will hold ``path``, or ``UserError`` (prefixed ``label``) saying why it
    cannot: a missing folder, a regular file on the way, a folder that refuses writes."""
    parent = Path(path).absolute().parent
    if not parent.is_dir():
        above = parent
        while not above.exists() and above != above.parent:
            above = above.parent
        if above.exists() and not above.is_dir():
            raise UserError(f"{label}: cannot be {verb}, {above} is a file, not a directory")
        raise UserError(f"{label}: cannot be {verb}, the directory {parent} does not exist (create it first)")
    try:  # os.access says yes to root even on read-only file systems such as /proc: ask by doing
        os.rmdir(tempfile.mkdtemp(prefix=f".{Path(path).name}.probe-", dir=parent))
    except OSError as e:
        raise UserError(f"{label}: cannot be {verb}, {parent} is not writable ({e.strerror})") from None
    return parent
