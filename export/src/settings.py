"""The contract's ``(sink_tokens, window)`` in TensorRT-LLM's terms, and the commands that use them.

The off-by-one
--------------
Here ``window`` (W) counts the current token: token t attends to at most C = S + W keys.

TensorRT-LLM's ``max_attention_window_size`` (L) counts the sink tokens. In every version that
can build a sink-token engine (0.9 to 0.21) it does *not* count the current token: the generation
kernel (masked MHA) attends to ``min(t, L)`` cached tokens plus the current one, and places the
query at position ``min(t, L)``. So L + 1 keys at most, and the translation is

    sink_token_length         = S
    max_attention_window_size = S + W - 1     (= C - 1)

Later kernels (the August 2025 "non-cyclic" rewrite, PR #6379, which also removed StreamingLLM)
attend to ``min(t, L - 1)`` cached tokens plus the current one, so L = C there; that convention is
kept as ``"inclusive"`` so that the emulation can show what a wrong translation would compute.

The context phase (the prompt) of a sink engine is dense: a prompt of n tokens is attended
causally at its text positions, whatever its length; only the sinks and the last L - S tokens
stay in the cache. For n <= C that is exactly the contract; for longer prompts it is not (see
``emulate.py``), which is why ``max_input_len`` defaults to C.
"""
from __future__ import annotations

import dataclasses
import shlex

from streaming_trt.contract import Geometry, UserError
from streaming_trt.runtime.versions import version_tuple

SINK_VERSIONS = "0.9.0 to 0.21.x"
CONVENTIONS = ("exclusive", "inclusive")


@dataclasses.dataclass(frozen=True)
class SinkSettings:
    """Contract sizes and their TensorRT-LLM translation."""

    sink_tokens: int
    window: int
    convention: str = "exclusive"  # how the engine counts max_attention_window_size; see the module doc

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.sink_tokens, self.window)

    @property
    def capacity(self) -> int:
        return self.geometry.capacity

    @property
    def sink_token_length(self) -> int:
        return self.sink_tokens

    @property
    def max_attention_window_size(self) -> int:
        return self.capacity - 1 if self.convention == "exclusive" else self.capacity

    def explain(self) -> str:
        s, w, c, l_ = self.sink_tokens, self.window, self.capacity, self.max_attention_window_size
        if self.convention == "exclusive":
            return (f"sink_tokens={s}, window={w} (window counts the current token; capacity {c}) -> "
                    f"sink_token_length={s}, max_attention_window_size={l_} = {s} + {w} - 1: in TensorRT-LLM "
                    f"{SINK_VERSIONS} max_attention_window_size counts the sinks but not the current token")
        return (f"sink_tokens={s}, window={w} (capacity {c}) -> sink_token_length={s}, "
                f"max_attention_window_size={l_}: counts the sinks and the current token")


def sink_settings(sink_tokens: int, window: int, convention: str = "exclusive") -> SinkSettings:
    """Validated settings; UserError with the reason otherwise."""
    Geometry(sink_tokens, window)  # the contract's own validation
    if window < 2:
        raise UserError(
            f"--window must be an integer >= 2 for a TensorRT-LLM engine, got {window}: the engine keeps "
            "window - 1 past tokens in a ring next to the sinks, and a ring of 0 slots is not supported")
    if convention not in CONVENTIONS:
        raise UserError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return SinkSettings(sink_tokens, window, convention)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The engine's limits (``trtllm-build`` flags)."""

    max_batch_size: int = 8
    max_input_len: int = 1024
    max_output_len: int = 1024
    gather_logits: bool = False  # keep context and generation logits (the parity tests compare them)

    @property
    def max_seq_len(self) -> int:
        return self.max_input_len + self.max_output_len


def check_engine_options(opts: EngineOptions, settings: SinkSettings, allow_dense_context: bool = False) -> None:
    for name in ("max_batch_size", "max_input_len", "max_output_len"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if opts.max_input_len > settings.capacity and not allow_dense_context:
        raise UserError(
            f"--max-input-len {opts.max_input_len} exceeds the cache capacity S + W = {settings.capacity}. "
            "TensorRT-LLM's sink engines attend to a whole prompt densely (every prompt token sees every earlier "
            "one), which is not the streaming contract once a prompt is longer than the capacity. Use "
            f"--max-input-len <= {settings.capacity}, or pass --allow-dense-context to accept that difference "
            "(docs/export.md quantifies it).")


def trtllm_build_command(checkpoint_dir: str, engine_dir: str, opts: EngineOptions,
                         trtllm_version: str | None = None, dtype: str = "auto") -> list[str]:
    """``trtllm-build`` with sink support on and the options StreamingLLM requires.

    ``--streamingllm enable`` turns on position shift and dense context attention;
    ``--use_paged_context_fmha disable`` is required by it (and rules out KV-cache reuse and chunked
    context at run time); ``--max_beam_width 1`` because the cyclic cache has no beam search.
    Written for 0.11 to 0.21; for 0.9/0.10 ``--max_output_len`` replaces ``--max_seq_len``.
    ``dtype``: the plugins' dtype; the checkpoint's dtype works in every version (``auto`` from 0.11).
    """
    cmd = [
        "trtllm-build",
        "--checkpoint_dir", checkpoint_dir,
        "--output_dir", engine_dir,
        "--streamingllm", "enable",
        "--use_paged_context_fmha", "disable",
        "--max_beam_width", "1",
        "--max_batch_size", str(opts.max_batch_size),
        "--max_input_len", str(opts.max_input_len),
    ]
    version = version_tuple(trtllm_version)
    if version is not None and version < (0, 11):
        cmd += ["--max_output_len", str(opts.max_output_len)]
    else:
        cmd += ["--max_seq_len", str(opts.max_seq_len)]
    cmd += ["--gemm_plugin", dtype, "--gpt_attention_plugin", dtype]
    if opts.gather_logits:
        cmd += ["--gather_context_logits", "--gather_generation_logits"]
    return cmd


def run_py_flags(settings: SinkSettings) -> list[str]:
    """Flags for TensorRT-LLM's ``examples/run.py`` (no ``--kv_cache_enable_block_reuse``, no
    ``--enable_chunked_context``: both default to off there and must stay off)."""
    return ["--sink_token_length", str(settings.sink_token_length),
            "--max_attention_window_size", str(settings.max_attention_window_size),
            "--num_beams", "1"]


def runtime_settings(settings: SinkSettings, opts: EngineOptions, build_command: list[str],
                     checkpoint_dir: str, engine_dir: str, engine_built: bool, tp: int, pp: int) -> dict:
    """What to pass the engine at run time, written next to it as ``runtime.json``."""
    s, l_ = settings.sink_token_length, settings.max_attention_window_size
    return {
        "format": "streaming-trt-engine/1",
        "contract": {"sink_tokens": settings.sink_tokens, "window": settings.window, "capacity": settings.capacity},
        "sink_token_length": s,
        "max_attention_window_size": l_,
        "translation": settings.explain(),
        "tensorrt_llm_versions": SINK_VERSIONS,
        "exact_prompt_len": settings.capacity,
        "exact_prompt_note": (
            f"prompts of up to {settings.capacity} tokens give the contract's logits; a longer prompt is attended "
            "densely by the engine's context phase (see docs/export.md)"),
        "required": {"enable_kv_cache_reuse": False, "enable_chunked_context": False, "beam_width": 1,
                     "use_paged_context_fmha": False},
        "run_py_flags": run_py_flags(settings),
        "model_runner_cpp": {"sink_token_length": s, "max_attention_window_size": [l_],
                             "kv_cache_enable_block_reuse": False, "enable_chunked_context": False},
        "kv_cache_config": {"sink_token_length": s, "max_attention_window": [l_], "enable_block_reuse": False},
        "engine": {"max_batch_size": opts.max_batch_size, "max_input_len": opts.max_input_len,
                   "max_output_len": opts.max_output_len, "tp": tp, "pp": pp},
        "checkpoint_dir": checkpoint_dir,
        "engine_dir": engine_dir,
        "engine_built": engine_built,
        "build_command": build_command,
    }


def build_script(build_command: list[str], settings: SinkSettings, missing: str | None) -> str:
    """A shell script that builds the engine on a machine with TensorRT-LLM and a GPU.

    ``missing`` says why the engine was not built here (None when it was: the script rebuilds it).
    """
    flags = " ".join(shlex.quote(f) for f in run_py_flags(settings))
    lines = [
        "#!/bin/sh",
        "# Build the TensorRT-LLM sink-token engine for this checkpoint.",
        f"# Not built here: {missing}." if missing else "# The engine was built with this command; rerun to rebuild.",
        f"# Needs TensorRT-LLM {SINK_VERSIONS} (StreamingLLM was removed later) and an NVIDIA GPU.",
        f"# {settings.explain()}.",
        "# Run-time flags for examples/run.py:",
        f"#   {flags}",
        "# and keep KV-cache block reuse and chunked context off (runtime.json lists them per API).",
        "set -e",
        'cd "$(dirname "$0")"',
        " ".join(shlex.quote(a) for a in build_command),
        "",
    ]
    return "\n".join(lines)
