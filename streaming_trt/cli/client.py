"""``python -m streaming_trt.cli.client``: a chat REPL against ``python -m streaming_trt.cli.serve`` over gRPC."""
from __future__ import annotations

import argparse
import os
import sys

from ..contract import UserError
from ..serving.client import Client, ServerError
from ..serving.protocol import ErrorKind
from . import common


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m streaming_trt.cli.client",
        description="Chat REPL against `python -m streaming_trt.common.serve` over Triton's gRPC stream. "
                    "Type a message and press Enter; /end ends the conversation on the server, "
                    "/quit or Ctrl-D leaves it saved (continue later with --conversation ID).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    p.add_argument("--conversation", type=int, help="continue the conversation with this id")
    p.add_argument("--system", help="system prompt of a new conversation")
    p.add_argument("--max-new-tokens", type=int, help="reply length (default: the server's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0, help="keep tokens at least this fraction as likely as the best")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off; above 1 discourages repeats")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]; 0: off")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]; 0: off")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a reply before TEXT (repeatable); TEXT itself is not shown")
    p.add_argument("--api-key", default=os.environ.get("STREAMING_TRT_API_KEY"),
                   help="the server's --api-key (default: $STREAMING_TRT_API_KEY)")
    args = p.parse_args(argv)
    return common.run(lambda: _repl(args))


def _repl(args) -> int:
    try:
        client = Client(args.url, api_key=args.api_key)
        if not client.is_server_ready():
            raise RuntimeError("the server is not ready")
    except Exception as e:  # tritonclient raises its own types for a bad address
        raise UserError(f"cannot reach a ready server at {args.url} ({e}); is `python -m streaming_trt.common.serve` "
                        "running?") from None
    resumed = args.conversation is not None
    chat = client.conversation(args.conversation, args.system)
    chat.started = resumed
    common.info(f"[streaming-trt] conversation {chat.id} on {args.url}")
    interactive = sys.stdin.isatty()
    sampling = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    options = {name: value for name, value, off in (("min_p", args.min_p, 0.0),
                                                    ("repetition_penalty", args.repetition_penalty, 1.0),
                                                    ("frequency_penalty", args.frequency_penalty, 0.0),
                                                    ("presence_penalty", args.presence_penalty, 0.0),
                                                    ("stop", args.stop, [])) if value != off}
    if options:
        sampling["options"] = options
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            if line.strip() == "/quit":
                break
            try:
                if line.strip() == "/end":
                    chat.end()
                    common.info("[streaming-trt] conversation ended")
                    break
                if not line.strip():
                    continue
                for piece in chat.send(line, **sampling):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except ServerError as e:
                again = (" (send it again when the server is back)"
                         if e.kind in (ErrorKind.UNAVAILABLE, ErrorKind.TIMEOUT) else "")
                common.info(f"\n[error: {e}]{again}")
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
