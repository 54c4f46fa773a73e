"""PyTorch's CPU thread count: ``--threads`` or a default that suits decoding."""
from __future__ import annotations

import os

import torch

from ..contract import UserError


DEFAULT_THREADS_HELP = "every CPU this process may use, at most 4, half of them beyond that"


def default_threads() -> int:
    """PyTorch CPU threads when --threads is not given.

    With OpenMP waiting passively (set by ``import streaming_trt``), using both cores of a 2-core
    machine was faster than one thread both idle and next to a busy process (README, Threads); a
    larger machine gets half its CPUs (SMT siblings add little to decoding), at least 4.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus if cpus <= 4 else max(4, cpus // 2)


def set_threads(threads: int | None) -> int:
    """Apply ``--threads`` (or the default) to PyTorch; returns the count used."""
    n = default_threads() if threads is None else threads
    if n < 1:
        raise UserError(f"--threads must be at least 1 (got {n})")
    torch.set_num_threads(n)
    return n
