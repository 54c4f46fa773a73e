"""Output directories that appear whole or not at all."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from streaming_trt.contract import UserError
from streaming_trt.paths import check_parent_writable


def check_output_dir(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Refuse an existing output (unless ``overwrite``) and a parent that cannot hold it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; choose another directory or pass {flag} to replace it")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a directory")
    check_parent_writable(path, str(path), "created")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, flag: str = "--overwrite") -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it becomes ``path``.

    On any exception the temporary directory is removed and ``path`` is left as it was. With
    ``overwrite`` an existing ``path`` is replaced only after everything else succeeded.
    """
    path = check_output_dir(path, overwrite, flag).absolute()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise UserError(f"{path}: cannot be created ({e.strerror})") from None
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except OSError as e:  # a disk that filled up, a directory made read-only meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{path}: writing failed ({e.strerror or e}{': ' + e.filename if e.filename else ''})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
