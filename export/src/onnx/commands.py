"""The command lines' ONNX paths: ``python -m streaming_trt.cli.build --format onnx`` and
``python -m streaming_trt.cli.generate --engine DIR``."""
from __future__ import annotations

from pathlib import Path

from streaming_trt.contract import Geometry, UserError
from streaming_trt.loading.load import load_model
from streaming_trt.loading.tokenizer import load_tokenizer

from ..files import check_output_dir
from .runner import OnnxSession, load_manifest
from .writer import Profile, check_dtype, export_onnx, say


def build_onnx(args) -> int:
    """The ``--format onnx`` writer of :mod:`streaming_trt.cli.build`: refuses TensorRT-LLM-only
    flags, loads ``--model`` (directory or .gguf) on the CPU in float32 and calls :func:`export_onnx`."""
    refused = [flag for flag, bad in (("--tp", getattr(args, "tp", 1) != 1), ("--pp", getattr(args, "pp", 1) != 1),
                                      ("--gather-logits", getattr(args, "gather_logits", False)),
                                      ("--checkpoint-only", getattr(args, "checkpoint_only", False)),
                                      ("--allow-dense-context", getattr(args, "allow_dense_context", False)),
                                      ("--triton-repo", bool(getattr(args, "triton_repo", None))),
                                      ("--triton-decoupled", getattr(args, "triton_decoupled", False))) if bad]
    if refused:
        raise UserError(f"{', '.join(refused)}: TensorRT-LLM options; --format onnx writes one graph for one device "
                        "(its Triton repositories go to OUTPUT/triton); drop them or use --format trtllm")
    dtype = "float32" if args.dtype == "auto" else args.dtype
    profile = Profile(max_batch=args.max_batch_size,
                      max_chunk=512 if args.max_input_len is None else args.max_input_len)
    Geometry(args.sink_tokens, args.window)  # refused before anything loads
    check_dtype(dtype)
    check_output_dir(args.output, args.overwrite)
    if not Path(args.model).exists():
        raise UserError(f"--model {args.model}: no such directory or file")
    model = load_model(args.model, dtype="float32", device="cpu", backend="torch")
    export_onnx(model, args.output, args.sink_tokens, args.window, dtype=dtype, profile=profile,
                tokenizer_source=args.model, overwrite=args.overwrite, source=str(args.model))
    say(f"run it: python -m streaming_trt.cli.generate --engine {args.output}; TensorRT: sh {args.output}/build_trt_engine.sh")
    return 0


def open_engine(args):
    """``python -m streaming_trt.cli.generate --engine DIR``: ``(OnnxSession, tokenizer)`` for the flags;
    refuses the flags an onnxruntime session cannot honour."""
    for flag, value in (("--save-session", getattr(args, "save_session", None)),
                        ("--load-session", getattr(args, "load_session", None))):
        if value:
            raise UserError(f"{flag} works with the eager runtime only; an onnxruntime session is not saved")
    m = load_manifest(args.engine)
    provider = "cuda" if str(getattr(args, "device", "cpu")).startswith("cuda") else "cpu"
    session = OnnxSession(args.engine, provider=provider, threads=getattr(args, "threads", None))
    tok_dir = Path(args.engine) / m["tokenizer"] if m.get("tokenizer") else None
    if tok_dir is None:
        say("the export has no tokenizer/: using the built-in character tokenizer")
    tokenizer = load_tokenizer(None if tok_dir is None else tok_dir)
    say(f"onnxruntime {provider}: {args.engine} (sink_tokens={session.sink_tokens}, window={session.window}, "
        f"{m['dtype']})")
    return session, tokenizer
