"""Multi-turn chat on one endless stream: ``python -m streaming_trt.chat``.

Every turn is appended to the same StreamingLLM stream: history is never re-encoded, memory stays
constant, and the chat runs for as long as the user types. Lines starting with ``/`` are commands:
``/save FILE`` writes the session (continue later with ``--load-session FILE``), ``/quit`` ends.
"""
from __future__ import annotations

import sys

from .errors import UserError
from .generation import eos_ids, generate_tokens
from .sampling import Sampler
from .tokenizer import IncrementalDecoder

_USER, _ASSISTANT = "\x01user-placeholder\x01", "\x01assistant-placeholder\x01"


class TurnEncoder:
    """Token ids for one new user turn, taken from the tokenizer's own chat template.

    The template is rendered over a fixed two-message conversation with and without the new turn;
    the difference is what the new turn adds to the stream. The cost does not grow with the
    conversation.
    """

    def __init__(self, tokenizer, system: str | None = None):
        self.tokenizer = tokenizer
        self.system = [{"role": "system", "content": system}] if system else []
        base = self.system + [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}]
        self._base = base
        # What the template puts after an assistant reply (end-of-turn marker, newline, ...).
        self.end_of_reply = self._render(base, False).split(_ASSISTANT, 1)[1]

    def _render(self, messages, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except Exception as e:  # a tokenizer without a template, or a template that rejects roles
            raise UserError(f"the tokenizer's chat template cannot be used ({type(e).__name__}: {e})") from None

    def first_turn(self, text: str) -> list[int]:
        return self._encode(self._render(self.system + [{"role": "user", "content": text}], True))

    def next_turn(self, text: str) -> list[int]:
        full = self._render(self._base + [{"role": "user", "content": text}], True)
        # Only what follows the earlier reply counts: templates such as Qwen3's render the newest
        # reply differently from older ones, and the stream already holds the reply as generated.
        after_reply = full.split(_ASSISTANT, 1)[-1]
        if _ASSISTANT not in full or not after_reply.startswith(self.end_of_reply):
            raise UserError("the chat template does not end a reply the same way in every turn; "
                            "it cannot be used for streaming chat")
        return self._encode(after_reply[len(self.end_of_reply):])

    def after_reply(self, last_token: int | None) -> list[int]:
        """Ids that close a reply, minus the stop token the model already produced."""
        end = self.end_of_reply
        if last_token is not None:
            said = self.tokenizer.decode([last_token])
            if end.startswith(said):
                end = end[len(said):]
        return self._encode(end) if end else []

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


def chat(session, tokenizer, lines, write, sampling, max_new_tokens: int, system: str | None = None,
         fresh: bool = True) -> int:
    """Run a conversation: ``lines`` yields user messages, ``write`` receives reply text.

    Returns the number of turns answered.
    """
    turns = TurnEncoder(tokenizer, system)
    stop = eos_ids(tokenizer, session.model.config)
    sampler = Sampler(sampling, session.model.device)
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
        ids = turns.first_turn(text) if fresh and answered == 0 else turns.next_turn(text)
        decoder = IncrementalDecoder(tokenizer)
        last = None
        for token in generate_tokens(session, ids, max_new_tokens, sampler=sampler, stop_token_ids=stop):
            last = token
            if token not in stop:
                write(decoder.push(token))
        closing = turns.after_reply(last if last in stop else None)
        if closing:
            session.feed(closing, all_logits=False)
        write("\n")
        answered += 1
    return answered


def main(argv: list[str] | None = None) -> int:
    from . import cli

    parser = cli.parser(
        "streaming_trt.chat",
        "Chat with a model on one endless StreamingLLM stream: every turn is appended to the same "
        "cache (attention sinks + rolling window), so the conversation can go on forever in constant "
        "memory. Type a message and press Enter; /save FILE writes the session, /quit or Ctrl-D ends.",
    )
    parser.add_argument("--system", help="system prompt placed before the first turn")
    parser.add_argument("--load-session", metavar="FILE", help="continue a conversation saved with /save")
    args = parser.parse_args(argv)
    return cli.run(lambda: _chat(args))


def _chat(args) -> int:
    from . import cli

    model, tokenizer = cli.load(args)
    session = cli.open_session(args, model)
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

    clock = cli.Clock(session)
    chat(session, tokenizer, lines(), write, cli.sampling(args), args.max_new_tokens, args.system,
         fresh=args.load_session is None)
    clock.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
