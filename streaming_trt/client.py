"""Client of the Triton-served chat: ``streaming_trt.client`` and ``python -m streaming_trt.client``.

>>> from streaming_trt.client import Client
>>> with Client("127.0.0.1:8001") as client:
...     chat = client.conversation()
...     for piece in chat.send("Hello!"):
...         print(piece, end="")
...     chat.end()

Built on ``tritonclient.grpc``'s bidirectional stream (the model is decoupled: one response per
reply token). If the server restarted or dropped an idle sequence, a turn is retried once with
START + RESUME, which continues the conversation saved on the server.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import random
import sys
import threading
from typing import Iterator

from .errors import UserError

MODEL_NAME = "streaming_llm"
_RESTARTED = "must specify the START flag"


class ServerError(UserError):
    """The server refused a request; the message is the server's."""


@dataclasses.dataclass
class Token:
    id: int
    text: str


@dataclasses.dataclass
class TurnSummary:
    prompt_tokens: int      # tokens the server fed for this turn's messages
    seen: int               # stream length after the turn
    finish_reason: str      # "stop", "length" or "cancelled"


class Client:
    """One gRPC stream to Triton; thread-safe (requests are told apart by request id)."""

    def __init__(self, url: str = "127.0.0.1:8001", model_name: str = MODEL_NAME, timeout: float = 300.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url, self.model_name, self.timeout = url, model_name, timeout
        self._client = grpcclient.InferenceServerClient(url)
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._client.start_stream(callback=self._on_response)

    def _on_response(self, result=None, error=None):
        request_id = None
        if result is not None:
            request_id = result.get_response().id
        elif error is not None:
            request_id = getattr(error, "request_id", None)
            if request_id is None:  # errors that name no request go to every waiting turn
                with self._lock:
                    for q in self._queues.values():
                        q.put((None, error))
                return
        with self._lock:
            q = self._queues.get(request_id)
        if q is not None:
            q.put((result, error))

    def close(self, cancel: bool = False) -> None:
        self._client.stop_stream(cancel_requests=cancel)
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def conversation(self, conversation_id: int | None = None, system: str | None = None) -> "Conversation":
        return Conversation(self, conversation_id, system)

    def turn(self, conversation_id: int, messages: list[dict], start: bool = False, end: bool = False,
             resume: bool = False, max_tokens: int | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None
             ) -> Iterator[Token | TurnSummary]:
        """Send one turn; yields a :class:`Token` per reply token, then one :class:`TurnSummary`.

        Raises :class:`ServerError` with the server's message on a refused request.
        """
        import numpy as np

        g = self._grpc
        inputs = []

        def add(name, value, dtype, np_dtype):
            t = g.InferInput(name, [1], dtype)
            t.set_data_from_numpy(np.array([value], dtype=np_dtype))
            inputs.append(t)

        data = np.frombuffer(json.dumps(messages).encode("utf-8"), dtype=np.uint8)
        t = g.InferInput("MESSAGES", [data.size], "UINT8")
        t.set_data_from_numpy(data)
        inputs.append(t)
        for name, value, dtype, np_dtype in (("MAX_TOKENS", max_tokens, "INT32", np.int32),
                                             ("TEMPERATURE", temperature, "FP32", np.float32),
                                             ("TOP_K", top_k, "INT32", np.int32), ("TOP_P", top_p, "FP32", np.float32),
                                             ("SEED", seed, "INT64", np.int64)):
            if value is not None:
                add(name, value, dtype, np_dtype)
        if resume:
            add("RESUME", True, "BOOL", np.bool_)
        request_id = f"{id(self)}-{next(self._ids)}"
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._queues[request_id] = q
        try:
            self._client.async_stream_infer(self.model_name, inputs, request_id=request_id,
                                            sequence_id=int(conversation_id), sequence_start=start,
                                            sequence_end=end)
            while True:
                try:
                    result, error = q.get(timeout=self.timeout)
                except queue.Empty:
                    raise ServerError(f"no response from the server within {self.timeout:.0f} s") from None
                if error is not None:
                    raise ServerError(str(error.message() if hasattr(error, "message") else error))
                token = int(result.as_numpy("TOKEN_ID").reshape(-1)[0])
                if token >= 0:
                    yield Token(token, result.as_numpy("TEXT").tobytes().decode("utf-8"))
                    continue
                yield TurnSummary(int(result.as_numpy("PROMPT_TOKENS").reshape(-1)[0]),
                                  int(result.as_numpy("SEEN").reshape(-1)[0]),
                                  result.as_numpy("FINISH").tobytes().decode("utf-8"))
                return
        finally:
            with self._lock:
                self._queues.pop(request_id, None)

    def end(self, conversation_id: int) -> None:
        """End a conversation: the server frees it and deletes its file."""
        for _ in self.turn(conversation_id, [], end=True):  # END with no messages: no turn
            pass


class Conversation:
    """A conversation on the server: :meth:`send` one user message per turn."""

    def __init__(self, client: Client, conversation_id: int | None = None, system: str | None = None,
                 started: bool = False):
        self.client = client
        self.id = conversation_id if conversation_id is not None else random.getrandbits(63) or 1
        self.system = system
        self.started = started
        self.last: TurnSummary | None = None

    def tokens(self, text: str, **sampling) -> Iterator[Token]:
        """The reply to ``text``, token by token; :attr:`last` holds the turn's summary afterwards."""
        system = [{"role": "system", "content": self.system}] if not self.started and self.system else []
        yield from self.message_tokens(system + [{"role": "user", "content": text}], **sampling)

    def message_tokens(self, messages: list[dict], **sampling) -> Iterator[Token]:
        """The reply to ``messages``: any history ending with a user message for a conversation not
        yet started, exactly one user message for one that is."""
        first = not self.started
        try:
            yield from self._turn(messages, start=first, **sampling)
        except ServerError as e:
            if first or _RESTARTED not in str(e):
                raise
            # Triton forgot the sequence (restart, idle timeout): continue the saved conversation.
            yield from self._turn(messages, start=True, resume=True, **sampling)
        self.started = True

    def _turn(self, messages, **kw) -> Iterator[Token]:
        for item in self.client.turn(self.id, messages, **kw):
            if isinstance(item, TurnSummary):
                self.last = item
            else:
                yield item

    def send(self, text: str, **sampling) -> Iterator[str]:
        """The reply to ``text`` as text pieces."""
        for token in self.tokens(text, **sampling):
            yield token.text

    def end(self) -> None:
        try:
            self.client.end(self.id)
        except ServerError as e:
            if _RESTARTED not in str(e):
                raise
            for _ in self.client.turn(self.id, [], start=True, resume=True, end=True):
                pass


def main(argv: list[str] | None = None) -> int:
    import argparse

    from . import cli

    p = argparse.ArgumentParser(
        prog="python -m streaming_trt.client",
        description="Chat REPL against `python -m streaming_trt.serve` over Triton's gRPC stream. "
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
    args = p.parse_args(argv)
    return cli.run(lambda: _repl(args))


def _repl(args) -> int:
    from . import cli

    try:
        client = Client(args.url)
        if not client._client.is_server_ready():
            raise RuntimeError("the server is not ready")
    except Exception as e:  # tritonclient raises its own types for a bad address
        raise UserError(f"cannot reach a ready server at {args.url} ({e}); is `python -m streaming_trt.serve` "
                        "running?") from None
    resumed = args.conversation is not None
    chat = client.conversation(args.conversation, args.system)
    chat.started = resumed
    cli.info(f"[streaming-trt] conversation {chat.id} on {args.url}")
    interactive = sys.stdin.isatty()
    sampling = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            if line.strip() == "/quit":
                break
            if line.strip() == "/end":
                chat.end()
                cli.info("[streaming-trt] conversation ended")
                break
            if not line.strip():
                continue
            try:
                for piece in chat.send(line, **sampling):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except ServerError as e:
                cli.info(f"[error: {e}]")
                continue
            sys.stdout.write("\n")
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
