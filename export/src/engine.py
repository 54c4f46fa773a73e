"""Finding a TensorRT-LLM that can build sink-token engines, and running its build.

``tensorrt_llm`` is never imported at module level (nor here at all: its version comes from the
installed package's metadata, and the build runs ``trtllm-build`` in a subprocess).
"""
from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys

import torch

from streaming_trt.contract import UserError
from streaming_trt.runtime.versions import version_tuple

from .settings import SINK_VERSIONS


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """Whether an engine can be built here, and if not, what is missing."""

    version: str | None  # installed tensorrt_llm version, None when absent
    cuda: bool
    build_exe: list[str] | None  # how to run trtllm-build
    missing: str | None  # None when everything needed is present

    @property
    def ready(self) -> bool:
        return self.missing is None


def supports_sinks(version: str | None) -> bool:
    """TensorRT-LLM builds StreamingLLM engines from 0.9.0 through 0.21.x."""
    v = version_tuple(version)
    return v is not None and (0, 9) <= v < (0, 22)


def _installed_version() -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return None
    for dist in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken torch install means no GPU for us
        return False


def find_toolchain() -> Toolchain:
    version = _installed_version()
    cuda = _cuda_available()
    exe = None
    if version is not None:
        path = shutil.which("trtllm-build")
        exe = [path] if path else [sys.executable, "-m", "tensorrt_llm.commands.build"]
    missing = []
    if version is None:
        missing.append(f"the tensorrt_llm package is not installed (sink engines need TensorRT-LLM {SINK_VERSIONS}; "
                       "its wheels are published for Python 3.10 and 3.12 on Linux with CUDA)")
    elif not supports_sinks(version):
        missing.append(f"tensorrt_llm {version} is installed, but StreamingLLM engines can only be built by "
                       f"TensorRT-LLM {SINK_VERSIONS} (later versions removed sink-token support)")
    if not cuda:
        missing.append("no CUDA GPU is visible to torch")
    return Toolchain(version=version, cuda=cuda, build_exe=exe, missing="; ".join(missing) or None)


def run_build(toolchain: Toolchain, build_command: list[str], log=print) -> None:
    """Run ``trtllm-build`` (``build_command[0]`` is replaced by the toolchain's executable).

    Output is streamed through ``log``; a failure raises UserError with the last lines.
    """
    if not toolchain.ready or toolchain.build_exe is None:
        raise UserError(f"cannot build an engine here: {toolchain.missing}")
    cmd = toolchain.build_exe + build_command[1:]
    tail: collections.deque[str] = collections.deque(maxlen=30)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise UserError(f"cannot run {cmd[0]}: {e}") from None
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        log(f"  trtllm-build: {line}")
    if proc.wait() != 0:
        raise UserError(f"trtllm-build failed with status {proc.returncode}; last output:\n" + "\n".join(tail))
