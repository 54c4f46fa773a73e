"""The export command line: a Hugging Face checkpoint in, a TensorRT-LLM sink-token engine out.

Run as ``python -m streaming_trt.cli.build``::

    python -m streaming_trt.cli.build --model ~/Llama-3.2-1B --output llama-sinks \\
        --sink-tokens 4 --window 1020 --dtype float16 --tp 2 --triton-repo llama-triton

Writes ``OUTPUT/checkpoint`` (TensorRT-LLM checkpoint), then, where TensorRT-LLM 0.9 to 0.21 and
a GPU are present, ``OUTPUT/engine``; always ``OUTPUT/runtime.json`` (the run-time settings, with
the window translated: ``max_attention_window_size = sink_tokens + window - 1``) and
``OUTPUT/build_engine.sh`` (the exact ``trtllm-build`` command). Everything is written beside
the target and renamed at the end, so a failure leaves nothing behind. See docs/export.md.

Each output format is one entry of :data:`FORMATS` (its flags are checked, then its writer runs);
the flags every format shares (model, output, sizes, dtype) live in :func:`parser`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

from ..contract import Geometry, UserError
from ..export.engine import find_toolchain, run_build
from ..export.files import atomic_dir, check_output_dir, save_tokenizer
from ..export.inference_server import TritonOptions, write_triton_repo
from ..export.onnx import build_onnx
from ..export.trtllm import ExportPlan, plan_export
from ..runtime.model import expected_shapes
from .common import run
from ..export.settings import (EngineOptions, SinkSettings, build_script, check_engine_options, runtime_settings,
                       sink_settings, trtllm_build_command)

PROG = "python -m streaming_trt.cli.build"

# The most memory one GPU has today (NVIDIA B300: 288 GB of HBM3e). Settings that cannot fit even
# one sequence there are refused; nothing is allocated to find out.
LARGEST_GPU_BYTES = 288 * 10**9
INT32_MAX = 2**31 - 1  # TensorRT-LLM holds lengths and window sizes in int32


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but not the empty ones of required flags and switches."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a Hugging Face Llama-family checkpoint to TensorRT-LLM with attention sinks "
                    "(StreamingLLM): writes the TensorRT-LLM checkpoint, builds the sink-token engine where "
                    "TensorRT-LLM 0.9-0.21 and a GPU are present (otherwise writes the exact trtllm-build "
                    "command), the run-time settings, and optionally a Triton Inference Server repository.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("input and output")
    g.add_argument("--model", required=True, metavar="DIR|FILE.gguf",
                   help="Hugging Face checkpoint directory (config.json + *.safetensors, tokenizer files if any)")
    g.add_argument("--output", required=True, metavar="DIR",
                   help="directory to create: checkpoint/, engine/ (when built), runtime.json, build_engine.sh")
    g.add_argument("--format", default="trtllm", choices=sorted(FORMATS),
                   help="what to write: trtllm = TensorRT-LLM checkpoint, sink-token engine (or its build "
                        "command) and run-time settings; onnx = one ONNX graph of the streaming step with explicit "
                        "K/V caches, a trtexec command and Triton repositories (docs/onnx.md; --max-input-len is "
                        "then the longest chunk per call, default 512)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace --output (and --triton-repo) if they exist, once everything else succeeded")
    g = p.add_argument_group("streaming cache (the contract: capacity = sink tokens + window)")
    g.add_argument("--sink-tokens", type=int, required=True, metavar="S",
                   help="first tokens of every stream kept forever (TensorRT-LLM sink_token_length = S)")
    g.add_argument("--window", type=int, required=True, metavar="W",
                   help="most recent tokens kept, the current one included; TensorRT-LLM's "
                        "max_attention_window_size = S + W - 1 (it counts sinks but not the current token)")
    g = p.add_argument_group("checkpoint")
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weight dtype; auto = the checkpoint's float16/bfloat16, else float16")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size (GPUs per pipeline stage)")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (stages; must divide the layers)")
    g = p.add_argument_group("engine (trtllm-build)")
    g.add_argument("--max-batch-size", type=int, default=8, help="most sequences the engine schedules at once")
    g.add_argument("--max-input-len", type=int, default=None,
                   help="longest prompt; default and maximum: the capacity S + W (longer prompts are attended "
                        "densely by TensorRT-LLM, see --allow-dense-context)")
    g.add_argument("--max-output-len", type=int, default=1024, help="most tokens generated per request")
    g.add_argument("--allow-dense-context", action="store_true",
                   help="allow --max-input-len above S + W, accepting that such prompts are attended densely "
                        "(not the streaming contract; docs/export.md says by how much)")
    g.add_argument("--gather-logits", action="store_true",
                   help="build with --gather_context_logits --gather_generation_logits (for parity tests)")
    g.add_argument("--checkpoint-only", action="store_true",
                   help="stop after the checkpoint even where TensorRT-LLM and a GPU are present")
    g = p.add_argument_group("Triton Inference Server")
    g.add_argument("--triton-repo", metavar="DIR",
                   help="also write a tensorrtllm_backend model repository (ensemble, preprocessing, "
                        "tensorrt_llm, postprocessing) for OUTPUT/engine here")
    g.add_argument("--triton-batching", default="inflight_fused_batching",
                   choices=["inflight_fused_batching", "V1"], help="gpt_model_type of the tensorrt_llm model")
    g.add_argument("--triton-decoupled", action="store_true",
                   help="decoupled transaction policy: stream tokens to the client")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and export; bad input: one line on stderr and exit status 2."""
    args = parser().parse_args(argv)
    return run(lambda: FORMATS[args.format](args))


def say(message: str) -> None:
    print(f"[streaming-trt build] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# What an engine needs on a GPU, estimated from the settings before anything is written
# ------------------------------------------------------------------------------------------------

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class EngineMemory:
    """Lower bounds, in bytes per GPU, of what a sink-token engine holds at run time."""

    weights: int  # this rank's share of the parameters
    kv_per_token: int  # keys + values of one cached token, this rank's layers and heads
    activation_per_token: int  # a prompt token's hidden state and residual in the (dense, unchunked) context phase
    capacity: int  # cached tokens per sequence (S + W)
    max_input_len: int
    max_batch_size: int

    def one_sequence(self) -> int:
        return self.weights + self.kv_per_token * self.capacity + self.activation_per_token * self.max_input_len

    def full_batch(self) -> int:
        return self.one_sequence() + self.kv_per_token * self.capacity * (self.max_batch_size - 1)


def engine_memory(plan: ExportPlan, settings: SinkSettings, opts: EngineOptions) -> EngineMemory:
    c, m = plan.source.config, plan.mapping
    itemsize = _ITEMSIZE[plan.dtype]
    params = sum(_numel(s) for s in expected_shapes(c).values())
    kv_heads = max(1, c.num_kv_heads // m.tp)  # fewer KV heads than ranks: each rank holds a copy of one
    return EngineMemory(
        weights=params * itemsize // m.world_size,
        kv_per_token=2 * (c.num_layers // m.pp) * kv_heads * c.head_dim * itemsize,
        activation_per_token=2 * c.hidden_size * itemsize,
        capacity=settings.capacity, max_input_len=opts.max_input_len, max_batch_size=opts.max_batch_size)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_engine_memory(need: EngineMemory, sink_tokens: int, window_default_input: bool) -> list[str]:
    """Refuse (UserError) settings whose one sequence cannot fit on any GPU; return warnings for a
    full batch that cannot be held at once."""
    if need.capacity > INT32_MAX or need.max_input_len > INT32_MAX:
        raise UserError(f"--sink-tokens + --window = {need.capacity} and --max-input-len = {need.max_input_len} "
                        f"must stay <= {INT32_MAX}: TensorRT-LLM holds lengths in 32-bit integers")
    one = need.one_sequence()
    if one > LARGEST_GPU_BYTES:
        per_token = need.kv_per_token + (need.activation_per_token if window_default_input else 0)
        fixed = need.weights + (0 if window_default_input else need.activation_per_token * need.max_input_len)
        fit = (LARGEST_GPU_BYTES - fixed) // per_token - sink_tokens if LARGEST_GPU_BYTES > fixed else -1
        advice = (f"choose --window <= {fit:,} (or more --tp / --pp)" if fit >= 2
                  else "lower --max-input-len or spread the model over more GPUs with --tp / --pp")
        raise UserError(
            f"an engine with capacity {need.capacity:,} needs at least {_gb(one)} per GPU for a single sequence "
            f"(weights {_gb(need.weights)}, KV cache {_gb(need.kv_per_token * need.capacity)}, prompt activations "
            f"{_gb(need.activation_per_token * need.max_input_len)}); no GPU has more than "
            f"{_gb(LARGEST_GPU_BYTES)}: {advice}")
    warnings = []
    full = need.full_batch()
    if full > LARGEST_GPU_BYTES:
        fits = 1 + (LARGEST_GPU_BYTES - one) // max(1, need.kv_per_token * need.capacity)
        warnings.append(
            f"--max-batch-size {need.max_batch_size} sequences of capacity {need.capacity:,} need at least "
            f"{_gb(full)} per GPU; even a {_gb(LARGEST_GPU_BYTES)} GPU holds at most {fits} at once "
            f"(TensorRT-LLM schedules fewer); lower --max-batch-size or --window to match")
    return warnings


# ------------------------------------------------------------------------------------------------
# Formats
# ------------------------------------------------------------------------------------------------

def build_trtllm(args) -> int:
    """The TensorRT-LLM checkpoint, engine (or its build command), runtime.json and Triton repository."""
    # 1. Everything that can be refused is refused before anything is written.
    settings = sink_settings(args.sink_tokens, args.window)
    plan = plan_export(args.model, dtype=args.dtype, tp=args.tp, pp=args.pp)
    source, mapping, dtype = plan.source, plan.mapping, plan.dtype
    _check_positions(args.sink_tokens, args.window, source.config.max_position_embeddings)  # a warning line
    opts = EngineOptions(
        max_batch_size=args.max_batch_size,
        max_input_len=settings.capacity if args.max_input_len is None else args.max_input_len,
        max_output_len=args.max_output_len,
        gather_logits=args.gather_logits,
    )
    check_engine_options(opts, settings, args.allow_dense_context)
    memory_warnings = check_engine_memory(engine_memory(plan, settings, opts), args.sink_tokens,
                                          args.max_input_len is None)
    output, repo = _check_outputs(args)
    toolchain = find_toolchain()
    build_engine = toolchain.ready and not args.checkpoint_only
    for note in plan.notes:
        say(f"note: {note}")
    for warning in memory_warnings:
        say(f"warning: {warning}")
    say(settings.explain())

    # 2. Write into temporary directories beside the targets; rename at the end.
    with contextlib.ExitStack() as stack:
        out_tmp = stack.enter_context(atomic_dir(output, args.overwrite))
        repo_tmp = stack.enter_context(atomic_dir(repo, args.overwrite, "--overwrite")) if repo else None

        say(f"reading {source.path} and writing the TensorRT-LLM checkpoint ({dtype}, tp={mapping.tp}, "
            f"pp={mapping.pp}, {mapping.world_size} rank file(s))")
        (out_tmp / "checkpoint").mkdir()
        plan.write(out_tmp / "checkpoint", progress=True)
        has_tokenizer = save_tokenizer(source.path, out_tmp / "tokenizer")
        if not has_tokenizer:
            say(f"warning: {source.path} has no tokenizer files; the Triton pre/postprocessing models need one "
                "(add tokenizer files to the model directory and rebuild, or point tokenizer_dir at one)")

        script_cmd = trtllm_build_command("checkpoint", "engine", opts, toolchain.version, dtype)
        engine_dir = output / "engine"
        if build_engine:
            say(f"building the engine with TensorRT-LLM {toolchain.version} (this takes minutes)")
            run_cmd = trtllm_build_command(str(out_tmp / "checkpoint"), str(out_tmp / "engine"), opts,
                                           toolchain.version, dtype)
            run_build(toolchain, run_cmd, log=lambda line: print(line, file=sys.stderr, flush=True))
            missing = None
        else:
            missing = "--checkpoint-only was given" if toolchain.ready else toolchain.missing
        script = out_tmp / "build_engine.sh"
        script.write_text(build_script(script_cmd, settings, missing))
        script.chmod(0o755)
        runtime = runtime_settings(settings, opts, script_cmd, str(output / "checkpoint"), str(engine_dir),
                                   engine_built=build_engine, tp=mapping.tp, pp=mapping.pp)
        (out_tmp / "runtime.json").write_text(json.dumps(runtime, indent=2) + "\n")

        if repo_tmp is not None:
            say(f"writing the Triton model repository {repo}")
            tokenizer_dir = output / "tokenizer" if has_tokenizer else source.path.absolute()
            write_triton_repo(repo_tmp, TritonOptions(
                engine_dir=str(engine_dir), tokenizer_dir=str(tokenizer_dir), max_batch_size=opts.max_batch_size,
                max_input_len=opts.max_input_len, batching_strategy=args.triton_batching,
                decoupled=args.triton_decoupled, sink_token_id=source.config.sink_token_id), settings)

    say(f"checkpoint: {output / 'checkpoint'}")
    if build_engine:
        say(f"engine: {engine_dir}")
    else:
        say(f"engine NOT built: {missing}.")
        say(f"to build it on a machine with TensorRT-LLM 0.9-0.21 and an NVIDIA GPU: sh {output / 'build_engine.sh'}")
    say("run it with sink_token_length={} max_attention_window_size={}, KV-cache reuse and chunked context off "
        "(runtime.json: examples/run.py flags {})".format(
            settings.sink_token_length, settings.max_attention_window_size, " ".join(runtime["run_py_flags"])))
    if repo:
        say(f"Triton repository: {repo} (tritonserver --model-repository {repo})")
    return 0


# name -> writer(args) -> exit status; a writer refuses every bad input before writing anything.
FORMATS: dict[str, Callable[[argparse.Namespace], int]] = {"trtllm": build_trtllm}


def _build_onnx(args) -> int:
    """``--format onnx``: one ONNX graph of the streaming step, onnxruntime/TensorRT/Triton files (docs/onnx.md)."""
    return build_onnx(args)


FORMATS["onnx"] = _build_onnx


def _check_outputs(args) -> tuple[Path, Path | None]:
    """``--output`` (and ``--triton-repo``) as absolute paths that can be created."""
    output = check_output_dir(args.output, args.overwrite).absolute()
    repo = None
    if getattr(args, "triton_repo", None):
        repo = Path(args.triton_repo).absolute()
        if repo == output or output in repo.parents or repo in output.parents:
            raise UserError("--triton-repo and --output must be separate directories, neither inside the other")
        check_output_dir(repo, args.overwrite)
    return output, repo


def _check_positions(sink_tokens: int, window: int, max_position_embeddings: int | None) -> None:
    """Warn where the engine would use rotary positions the model was never trained on."""
    Geometry(sink_tokens, window).check_positions(max_position_embeddings)


if __name__ == "__main__":
    sys.exit(main())
