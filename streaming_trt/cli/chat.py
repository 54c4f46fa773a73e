"""Multi-turn chat on one endless stream: ``python -m streaming_trt.cli.chat``.

Every turn is appended to the same StreamingLLM stream: history is never re-encoded, memory stays
constant, and the chat runs for as long as the user types. Lines starting with ``/`` are commands:
``/save FILE`` writes the session (continue later with ``--load-session FILE``), ``/quit`` ends.
"""
from __future__ import annotations

import sys

from ..contract import UserError
from ..runtime.chat import Chat
from . import common
from ..runtime.generation import eos_ids
from ..runtime.sampling import Sampler


def chat(session, tokenizer, lines, write, sampling, max_new_tokens: int, system: str | None = None,
         fresh: bool = True, stop_strings: tuple[str, ...] = ()) -> int:
    """Run a conversation: ``lines`` yields user messages, ``write`` receives reply text.

    Returns the number of turns answered.
    """
    conversation = Chat(tokenizer, eos_ids(tokenizer, session.config), system, started=not fresh)
    sampler = Sampler(sampling, session.device)
    answered = 0
    for line in lines:
        text = line.rstrip("\n")
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command == "/quit":
                break
            if command == "/save" and arg.strip():
                try:
                    session.save(arg.strip())
                    write(f"[session saved to {arg.strip()}]\n")
                except UserError as e:  # a bad path must not end the conversation
                    write(f"[error: {e}]\n")
            else:
                write("[commands: /save FILE, /quit]\n")
            continue
        if not text.strip():
            continue
        for _, piece in conversation.reply(session, text, max_new_tokens, sampler, stop_strings=stop_strings):
            write(piece)
        write("\n")
        answered += 1
    return answered


def main(argv: list[str] | None = None) -> int:

    parser = common.parser(
        "streaming_trt.cli.chat",
        "Chat with a model on one endless StreamingLLM stream: every turn is appended to the same "
        "cache (attention sinks + rolling window), so the conversation can go on forever in constant "
        "memory. Type a message and press Enter; /save FILE writes the session, /quit or Ctrl-D ends.",
    )
    parser.add_argument("--system", help="system prompt placed before the first turn")
    parser.add_argument("--load-session", metavar="FILE", help="continue a conversation saved with /save")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end a reply before TEXT once it appears; TEXT itself is not printed (repeatable)")
    common.add_recall_flags(parser)
    args = parser.parse_args(argv)
    return common.run(lambda: _chat(args))


def _chat(args) -> int:

    model, tokenizer = common.load(args)
    session = common.open_session(args, model)
    interactive = sys.stdin.isatty()

    def lines():
        while True:
            try:
                with clock.waiting():  # the user's typing is not the model's time
                    line = input("you> " if interactive else "")
            except EOFError:
                if interactive:  # Ctrl-D leaves the cursor after "you> "
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                return
            yield line

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    clock = common.Clock(session)
    chat(session, tokenizer, lines(), write, common.sampling(args, session.window), args.max_new_tokens, args.system,
         fresh=args.load_session is None, stop_strings=tuple(args.stop))
    clock.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
