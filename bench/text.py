"""``python -m bench.text``: find, fetch or write out one of Jane Austen's novels, the benchmarks'
English text (the reader is :mod:`streaming_trt.train.books`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streaming_trt.cli import common as cli
from streaming_trt.contract import UserError
from streaming_trt.train.books import BOOKS, book, describe, locate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.text", description="Jane Austen's novels from a Debian "
                                "package (public domain texts), the benchmarks' English text.",
                                epilog="example: python -m bench.text --book pride --out pride.txt")
    p.add_argument("--book", default="pride", help=f"all, {', '.join(BOOKS)} (default: %(default)s)")
    p.add_argument("--out", metavar="FILE", help="write the text here (default: print where it is and its size)")
    p.add_argument("--no-fetch", action="store_true", help="do not apt-get download the package when missing")
    args = p.parse_args(argv)

    def job() -> int:
        text = book(args.book, allow_fetch=not args.no_fetch)
        if args.out:
            try:
                Path(args.out).write_text(text, encoding="utf-8")
            except OSError as e:
                raise UserError(f"--out {args.out}: cannot write ({e.strerror})") from None
        print(f"{describe(args.book)}; {len(text):,} characters, {len(text.split()):,} words; "
              f"from {locate(False)}" + (f"; wrote {args.out}" if args.out else ""))
        return 0

    return cli.run(job)


if __name__ == "__main__":
    sys.exit(main())
