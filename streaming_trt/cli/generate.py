"""``python -m streaming_trt.cli.generate``: a prompt in, text streamed out, in constant memory.

Example::

    python -m streaming_trt.cli.generate --model ~/Llama-3.2-1B-Instruct --prompt "Once upon a time" \\
        --sink-tokens 4 --window 1020 --max-new-tokens 2000 --temperature 0.7 --top-p 0.9 --seed 0

Sampling follows the checkpoint's ``generation_config.json`` where it has one, else temperature 0.7
and top-p 0.9 with a fresh seed, printed so that the run can be repeated; ``--temperature 0`` is greedy.
"""
from __future__ import annotations

import sys

from ..contract import UserError
from . import common
from ..export.onnx import open_engine
from ..runtime.generation import generate_text

DEFAULT_PROMPT = "Once upon a time"


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(
        "streaming_trt.cli.generate",
        "Generate text from a prompt with a StreamingLLM cache (attention sinks + rolling window): "
        "memory stays constant however many tokens are generated.",
    )
    parser.add_argument("--prompt", default=None,
                        help=f"text to continue (default: {DEFAULT_PROMPT!r} for a new session, nothing when "
                             "continuing one with --load-session)")
    parser.add_argument("--prompt-file", help="read the prompt from this file instead of --prompt")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before TEXT once the output contains it; TEXT itself is not printed (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    parser.add_argument("--engine", metavar="DIR",
                        help="run an ONNX export (python -m streaming_trt.cli.build --format onnx) on onnxruntime "
                             "instead of the eager model; its sink/window settings are used (docs/onnx.md)")
    parser.add_argument("--save-session", metavar="FILE", help="write the session state here when done")
    parser.add_argument("--load-session", metavar="FILE",
                        help="continue a session saved with --save-session (its sink/window settings are used)")
    common.add_recall_flags(parser)
    args = parser.parse_args(argv)
    return common.run(lambda: _generate(args))


def _generate(args) -> int:
    common.check_output_file(args.save_session, "--save-session")  # before the model loads and generates
    if getattr(args, "engine", None):
        if args.recall:
            raise UserError("--recall runs on the eager model, not on an --engine export: drop one of them")
        session, tokenizer = open_engine(args)
    else:
        model, tokenizer = common.load(args)
        session = common.open_session(args, model)
    prompt = args.prompt
    if prompt is None:
        prompt = DEFAULT_PROMPT if args.load_session is None else ""
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise UserError(f"--prompt-file: {e}") from None
    if not prompt and args.load_session is None:
        raise UserError("the prompt is empty: pass --prompt TEXT or --prompt-file FILE")
    stop = set() if args.ignore_eos else None
    sampling = common.sampling(args, session.window)
    clock = common.Clock(session)
    for piece in generate_text(session, tokenizer, prompt, args.max_new_tokens, sampling, stop, args.stop,
                               add_special_tokens=args.load_session is None):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    clock.report()
    if args.save_session:
        session.save(args.save_session)
        common.info(f"session saved to {args.save_session}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
