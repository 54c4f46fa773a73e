"""Output directories that appear whole or not at all."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from streaming_trt.contract import UserError
from streaming_trt.runtime.paths import check_parent_writable
from streaming_trt.loading.tokenizer import BuiltinTokenizer, load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "config.json")


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


def save_tokenizer(source: str | Path | None, dest: str | Path) -> bool:
    """Put the tokenizer of ``source`` into ``dest``: a checkpoint directory's files (what
    AutoTokenizer reads) copied as they are, or the one transformers builds from a ``.gguf`` file
    (or ``builtin:smollm2``) saved there. False, and ``dest`` not created, when there is none."""
    if source is None:
        return False
    folder, dest = Path(source), Path(dest)
    if folder.is_dir():
        if not any((folder / n).is_file() for n in TOKENIZER_FILES):
            return False
        dest.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES + TOKENIZER_EXTRAS:
            if (folder / name).is_file():
                shutil.copy2(folder / name, dest / name)
        return True
    try:
        tok = load_tokenizer(source)
    except UserError:
        return False
    if isinstance(tok, BuiltinTokenizer) or not hasattr(tok, "save_pretrained"):
        return False
    tok.save_pretrained(str(dest))
    return True
