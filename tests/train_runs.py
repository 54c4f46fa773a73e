"""Tiny training runs shared by the tests of python -m streaming_trt.cli.train (seconds on a CPU)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from streaming_trt.train import Settings, train
from streaming_trt.cli import train as cli

TEXT = Path(__file__).resolve().parent.parent / "bench" / "data" / "builtin_text.txt"


def text_file(folder: Path) -> Path:
    """The first 40,000 characters of the built-in text, as a file."""
    path = folder / "text.txt"
    path.write_text(TEXT.read_text()[:40000])
    return path


def tiny(text: Path, out: Path, **kw) -> Settings:
    """The ``tiny`` preset on ``text``, one thread, 10% held out; ``kw`` overrides."""
    return dataclasses.replace(Settings(), **{**cli.PRESETS["tiny"], "text": str(text), "out": str(out),
                                              "heldout": 0.1, "threads": 1, **kw})


def runs(tmp_path_factory):
    """``get(variant) -> run folder`` of a tiny model trained for 8 steps, made once per variant."""
    made = {}
    text = text_file(tmp_path_factory.mktemp("text"))

    def get(variant: str) -> Path:
        if variant not in made:
            out = tmp_path_factory.mktemp(variant)
            train(tiny(text, out, variant=variant, steps=8, save_every=8, measure_every=4), quiet=True)
            made[variant] = out
        return made[variant]

    return get
