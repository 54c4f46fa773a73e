"""``python -m streaming_trt.build``: a Hugging Face checkpoint in, a TensorRT-LLM sink-token engine out.

Example::

    python -m streaming_trt.build --model ~/Llama-3.2-1B --output llama-sinks \\
        --sink-tokens 4 --window 1020 --dtype float16 --tp 2 --triton-repo llama-triton

Writes ``OUTPUT/checkpoint`` (TensorRT-LLM checkpoint), then, where TensorRT-LLM 0.9 to 0.21 and
a GPU are present, ``OUTPUT/engine``; always ``OUTPUT/runtime.json`` (the run-time settings, with
the window translated: ``max_attention_window_size = sink_tokens + window - 1``) and
``OUTPUT/build_engine.sh`` (the exact ``trtllm-build`` command). Everything is written beside
the target and renamed at the end, so a failure leaves nothing behind. See docs/export.md.

This module is the command line only: the work is in ``streaming_trt.export``, imported when
the command runs (the runtime never imports the exporter).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError
from .session import check_window


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but not the empty ones of required flags and switches."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m streaming_trt.build",
        description="Export a Hugging Face Llama-family checkpoint to TensorRT-LLM with attention sinks "
                    "(StreamingLLM): writes the TensorRT-LLM checkpoint, builds the sink-token engine where "
                    "TensorRT-LLM 0.9-0.21 and a GPU are present (otherwise writes the exact trtllm-build "
                    "command), the run-time settings, and optionally a Triton Inference Server repository.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("input and output")
    g.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face checkpoint directory (config.json + *.safetensors, tokenizer files if any)")
    g.add_argument("--output", required=True, metavar="DIR",
                   help="directory to create: checkpoint/, engine/ (when built), runtime.json, build_engine.sh")
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
    from .cli import run

    args = parser().parse_args(argv)
    return run(lambda: build(args))


def _say(message: str) -> None:
    print(f"[streaming-trt build] {message}", file=sys.stderr, flush=True)


def build(args) -> int:
    import contextlib

    from streaming_trt.export import (EngineOptions, TritonOptions, atomic_dir, check_engine_options,
                                      check_output_dir, find_toolchain, plan_export, run_build, runtime_settings,
                                      sink_settings, trtllm_build_command, write_triton_repo)
    from streaming_trt.export.settings import build_script
    from streaming_trt.export.triton import copy_tokenizer

    # 1. Everything that can be refused is refused before anything is written.
    settings = sink_settings(args.sink_tokens, args.window)
    plan = plan_export(args.model, dtype=args.dtype, tp=args.tp, pp=args.pp)
    source, notes, mapping, dtype = plan.source, plan.notes, plan.mapping, plan.dtype
    check_window(args.sink_tokens, args.window, source.config.max_position_embeddings)  # a warning line
    opts = EngineOptions(
        max_batch_size=args.max_batch_size,
        max_input_len=settings.capacity if args.max_input_len is None else args.max_input_len,
        max_output_len=args.max_output_len,
        gather_logits=args.gather_logits,
    )
    check_engine_options(opts, settings, args.allow_dense_context)
    output = check_output_dir(args.output, args.overwrite).absolute()
    repo = None
    if args.triton_repo:
        repo = Path(args.triton_repo).absolute()
        if repo == output or output in repo.parents or repo in output.parents:
            raise UserError("--triton-repo and --output must be separate directories, neither inside the other")
        check_output_dir(repo, args.overwrite)
    toolchain = find_toolchain()
    build_engine = toolchain.ready and not args.checkpoint_only
    for note in notes:
        _say(f"note: {note}")
    _say(settings.explain())

    # 2. Write into temporary directories beside the targets; rename at the end.
    with contextlib.ExitStack() as stack:
        out_tmp = stack.enter_context(atomic_dir(output, args.overwrite))
        repo_tmp = stack.enter_context(atomic_dir(repo, args.overwrite, "--overwrite")) if repo else None

        _say(f"reading {source.path} and writing the TensorRT-LLM checkpoint ({dtype}, tp={mapping.tp}, "
             f"pp={mapping.pp}, {mapping.world_size} rank file(s))")
        (out_tmp / "checkpoint").mkdir()
        plan.write(out_tmp / "checkpoint", progress=True)
        tokenizer_files = copy_tokenizer(source.path, out_tmp / "tokenizer")
        has_tokenizer = bool(tokenizer_files)
        if not has_tokenizer:
            _say(f"warning: {source.path} has no tokenizer files; the Triton pre/postprocessing models need one "
                 "(add tokenizer files to the model directory and rebuild, or point tokenizer_dir at one)")

        script_cmd = trtllm_build_command("checkpoint", "engine", opts, toolchain.version, dtype)
        engine_dir = output / "engine"
        if build_engine:
            _say(f"building the engine with TensorRT-LLM {toolchain.version} (this takes minutes)")
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
            _say(f"writing the Triton model repository {repo}")
            tokenizer_dir = output / "tokenizer" if has_tokenizer else source.path.absolute()
            write_triton_repo(repo_tmp, TritonOptions(
                engine_dir=str(engine_dir), tokenizer_dir=str(tokenizer_dir), max_batch_size=opts.max_batch_size,
                max_input_len=opts.max_input_len, batching_strategy=args.triton_batching,
                decoupled=args.triton_decoupled), settings)

    _say(f"checkpoint: {output / 'checkpoint'}")
    if build_engine:
        _say(f"engine: {engine_dir}")
    else:
        _say(f"engine NOT built: {missing}.")
        _say(f"to build it on a machine with TensorRT-LLM 0.9-0.21 and an NVIDIA GPU: sh {output / 'build_engine.sh'}")
    _say("run it with sink_token_length={} max_attention_window_size={}, KV-cache reuse and chunked context off "
         "(runtime.json: examples/run.py flags {})".format(
             settings.sink_token_length, settings.max_attention_window_size, " ".join(runtime["run_py_flags"])))
    if repo:
        _say(f"Triton repository: {repo} (tritonserver --model-repository {repo})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
