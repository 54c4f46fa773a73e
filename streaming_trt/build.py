"""``python -m streaming_trt.build``: a Hugging Face checkpoint in, a TensorRT-LLM sink-token engine
(or an ONNX graph) out.

A thin entry point in the top layer (README.md, "Imports point one way"): the command line lives in
:mod:`streaming_trt.export.cli` (``--help`` lists the flags; docs/export.md explains them).
"""
from __future__ import annotations

import sys

from .export.cli import main

if __name__ == "__main__":
    sys.exit(main())
