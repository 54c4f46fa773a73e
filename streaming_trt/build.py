"""``python -m streaming_trt.build``: a Hugging Face checkpoint in, a TensorRT-LLM sink-token engine out.

A thin entry point: the command line lives in :mod:`streaming_trt.export.cli` (``--help`` lists
the flags; docs/export.md explains them), imported when the command runs, so the runtime never
imports the exporter.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .export.cli import main as export_main

    return export_main(argv)


if __name__ == "__main__":
    sys.exit(main())
