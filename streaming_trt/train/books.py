"""Real English text for the benchmarks: Jane Austen's six novels from a Debian package.

Source: Debian's ``r-cran-janeaustenr`` (Architecture: all, 1.8 MB), the CRAN package janeaustenr
(packaging MIT, Julia Silge) with the six completed novels as prepared from Project Gutenberg;
the novels themselves (1811-1817) are in the public domain. R is not needed: the file
``usr/lib/R/site-library/janeaustenr/data/Rdata.rdb`` is read here directly.

Where it comes from, in order: ``$STREAMING_TRT_TEXT_DIR`` (a folder where the .deb was unpacked),
the installed package (``apt-get install r-cran-janeaustenr``), this module's cache
(``~/.cache/streaming-trt/text/``), else (``fetch=True``) ``apt-get download r-cran-janeaustenr``
and ``dpkg -x`` into that cache (needs apt and a package list: ``apt-get update`` once).

Format read: R's lazy-load database is one record per object, each a 4-byte big-endian length
followed by a zlib stream; each record is R's XDR serialization (``X\\n``, version 3) of one
character vector (STRSXP), one element per line of the novel.

``python -m bench.text --help`` fetches or writes a novel; benchmarks and training take
``--text austen:pride`` (or ``austen:all``), read by :func:`austen_text`.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from streaming_trt.contract import UserError

PACKAGE = "r-cran-janeaustenr"
INSIDE = Path("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
SYSTEM = Path("/") / INSIDE
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streaming-trt" / "text" / PACKAGE
# Record order in Rdata.rdb (alphabetical by object name) -> (key, title)
BOOKS = {
    "emma": (0, "Emma"),
    "mansfield": (1, "Mansfield Park"),
    "northanger": (2, "Northanger Abbey"),
    "persuasion": (3, "Persuasion"),
    "pride": (4, "Pride and Prejudice"),
    "sense": (5, "Sense and Sensibility"),
}
SOURCE = (f"Jane Austen's novels (public domain, 1811-1817) from the Debian package {PACKAGE} "
          f"(CRAN janeaustenr, MIT packaging, texts from Project Gutenberg)")


def _candidates() -> list[Path]:
    out = []
    if os.environ.get("STREAMING_TRT_TEXT_DIR"):
        out.append(Path(os.environ["STREAMING_TRT_TEXT_DIR"]) / INSIDE)
    return out + [SYSTEM, CACHE / INSIDE]


def fetch() -> Path:
    """``apt-get download`` the package and unpack it into the cache; returns the .rdb path."""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise UserError(f"the Austen text needs the Debian package {PACKAGE}: this machine has no apt-get/dpkg; "
                        f"unpack the .deb somewhere and set STREAMING_TRT_TEXT_DIR, or pass --text FILE")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if r.returncode or not debs:
            why = (r.stderr.strip().splitlines() or ["no .deb"])[-1]
            raise UserError(f"apt-get download {PACKAGE} failed ({why}); run 'apt-get update' first, "
                            f"or 'apt-get install {PACKAGE}', or pass --text FILE")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(CACHE)], check=True)
    path = CACHE / INSIDE
    if not path.is_file():
        raise UserError(f"{debs[0].name} has no {INSIDE}; the package changed, pass --text FILE")
    return path


def locate(allow_fetch: bool = True) -> Path:
    """Path of Rdata.rdb (see the module docstring for the search order)."""
    for p in _candidates():
        if p.is_file():
            return p
    if not allow_fetch:
        raise UserError(f"the Austen text is not here: apt-get install {PACKAGE}, or run python -m bench.text")
    return fetch()


def _records(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        d = zlib.decompressobj()
        raw = d.decompress(data[pos + 4 :])
        if len(raw) != n:
            raise UserError("Rdata.rdb: a record does not decompress to its stated length (corrupt file?)")
        out.append(raw)
        pos = len(data) - len(d.unused_data)
    return out


def _strings(raw: bytes) -> list[str]:
    """An R XDR serialization (version 3) of a character vector -> its elements (NA -> '')."""
    if raw[:2] != b"X\n":
        raise UserError("Rdata.rdb: not an R XDR serialization")
    (version,) = struct.unpack(">i", raw[2:6])
    i = 14  # "X\n", version, writer's R version, minimal R version
    if version == 3:
        (n_enc,) = struct.unpack(">i", raw[i : i + 4])
        i += 4 + n_enc
    flags, n = struct.unpack(">ii", raw[i : i + 8])
    if flags & 0xFF != 16:  # STRSXP
        raise UserError("Rdata.rdb: a record is not a character vector")
    i += 8
    lines = []
    for _ in range(n):
        _, length = struct.unpack(">ii", raw[i : i + 8])
        i += 8
        if length < 0:
            lines.append("")
            continue
        lines.append(raw[i : i + length].decode("utf-8", errors="replace"))
        i += length
    return lines


def book(name: str = "pride", allow_fetch: bool = True) -> str:
    """The text of one novel (``name`` in :data:`BOOKS`) or of all six in order (``"all"``)."""
    if name != "all" and name not in BOOKS:
        raise UserError(f"unknown book {name!r}; choose from all, {', '.join(BOOKS)}")
    records = _records(locate(allow_fetch).read_bytes())
    if len(records) != len(BOOKS):
        raise UserError(f"Rdata.rdb holds {len(records)} objects, expected {len(BOOKS)}")
    keys = list(BOOKS) if name == "all" else [name]
    return "\n\n".join("\n".join(_strings(records[BOOKS[k][0]])) for k in keys)


def describe(name: str) -> str:
    title = "all six novels" if name == "all" else BOOKS[name][1]
    return f"{title}: {SOURCE}"


def austen_text(spec: str, default: str = "all") -> tuple[str, str]:
    """``austen:BOOK`` (``austen:`` alone: ``default``) -> (the text, what it is)."""
    name = spec.split(":", 1)[1] or default
    return book(name), describe(name)
