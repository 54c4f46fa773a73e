"""Client of the Triton-served chat (its REPL: ``python -m streaming_trt.cli.client``).

>>> from streaming_trt.serving.client import Client
>>> with Client("127.0.0.1:8001") as client:
...     chat = client.conversation()
...     for piece in chat.send("Hello!"):
...         print(piece, end="")
...     chat.end()

Built on ``tritonclient.grpc``'s bidirectional stream (the model is decoupled: one response per
reply token). Each turn in flight has a gRPC stream of its own (idle streams are reused), because
tritonclient's errors carry no request id: so an error always reaches the turn it belongs to, and a
stream that broke (a server restart) is replaced by a fresh one on the next turn.

A conversation does not hold a Triton sequence slot between turns: the server releases the slot of
an idle conversation (``--sequence-idle-seconds``), refusing its next turn with "must specify the
START flag" before the model sees it (error kind ``SEQUENCE_RELEASED``); the turn is then sent again
with START + RESUME, which continues the conversation saved on the server. Nothing else is ever
resent, so no message is fed twice. The tensors, records and error kinds are
:mod:`streaming_trt.serving.protocol`'s.
"""
from __future__ import annotations

import itertools
import queue
import secrets
import threading
from typing import Iterator

from .protocol import (MODEL_NAME, ErrorKind, ServingError, TokenEvent, TurnResult, decode_error, decode_response,
                       request_inputs)


class ServerError(ServingError):
    """The server refused or failed a request; the message is the server's, ``kind`` (an
    :class:`~streaming_trt.serving.protocol.ErrorKind`, carried on the wire) says whose fault and
    whether to retry: BAD_REQUEST (do not resend it as is), UNKNOWN_CONVERSATION, BUSY (retry
    later), SHUTTING_DOWN, INTERNAL (a server bug), UNAVAILABLE (the server cannot be reached or the
    connection broke; retry when it is back), TIMEOUT (no response in time)."""


def _server_error(error) -> ServerError:
    """A tritonclient error as a ServerError: in-band errors (the model's or Triton's refusal of one
    request) have no gRPC status and carry the protocol's error payload; a failed stream has a status."""
    message = str(error.message() if hasattr(error, "message") else error)
    status = error.status() if hasattr(error, "status") else None
    if status is not None:
        kind = ErrorKind.TIMEOUT if "DEADLINE_EXCEEDED" in str(status) else ErrorKind.UNAVAILABLE
        return ServerError(f"the connection to the server broke ({status}: {message})", kind)
    kind, text = decode_error(message)
    return ServerError(text, kind)


class _Stream:
    """One gRPC stream carrying one request at a time: every response and error on it is that request's."""

    def __init__(self, grpcclient, url: str, headers: dict | None):
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.broken = False
        self.client.start_stream(callback=self._on_response, headers=headers)

    def _on_response(self, result=None, error=None):
        if error is not None and getattr(error, "status", lambda: None)() is not None:
            self.broken = True  # the stream itself failed: tritonclient refuses to send on it now
        self.responses.put((result, error))

    def close(self, cancel: bool) -> None:
        try:
            self.client.stop_stream(cancel_requests=cancel)
            self.client.close()
        except Exception:  # a stream that already broke has nothing left to close cleanly
            pass


class Client:
    """Turns to a Triton-served chat model; thread-safe (every turn in flight has its own gRPC stream).

    ``api_key``: sent as the gRPC header ``triton-grpc-protocol-authorization: Bearer KEY`` (a server
    started with ``--api-key`` needs it).
    """

    def __init__(self, url: str = "127.0.0.1:8001", model_name: str = MODEL_NAME, timeout: float = 300.0,
                 api_key: str | None = None, max_idle_streams: int = 8):
        import tritonclient.grpc as grpcclient  # the [serve] extra, optional

        self._grpc = grpcclient
        self.url, self.model_name, self.timeout = url, model_name, timeout
        # Triton's --grpc-restricted-protocol=...:authorization=... expects the key under this prefixed name
        self._headers = {"triton-grpc-protocol-authorization": f"Bearer {api_key}"} if api_key else None
        self._client = grpcclient.InferenceServerClient(url)  # health and metadata calls
        self._idle: list[_Stream] = []
        self._busy: set[_Stream] = set()
        self._max_idle = max_idle_streams
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = False

    def is_server_ready(self) -> bool:
        return bool(self._client.is_server_ready(headers=self._headers))

    def _take(self) -> tuple[_Stream, bool]:
        """A stream with nothing in flight, and whether it was used before."""
        with self._lock:
            if self._closed:
                raise ServerError("this Client is closed", "unavailable")
            while self._idle:
                stream = self._idle.pop()
                if stream.broken or not stream.responses.empty():  # broke while idle (a server restart)
                    stream.close(cancel=True)
                    continue
                self._busy.add(stream)
                return stream, True
        try:
            stream = _Stream(self._grpc, self.url, self._headers)
        except Exception as e:  # tritonclient raises its own types for a bad address
            raise ServerError(f"cannot reach the server at {self.url} ({e})", "unavailable") from None
        with self._lock:
            self._busy.add(stream)
        return stream, False

    def _give_back(self, stream: _Stream, reusable: bool) -> None:
        with self._lock:
            self._busy.discard(stream)
            if reusable and not stream.broken and not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(stream)
                return
        stream.close(cancel=True)  # something may still be in flight on it: it is never reused

    def close(self, cancel: bool = False) -> None:
        """Close every stream; ``cancel`` cancels the turns in flight (otherwise they finish first)."""
        with self._lock:
            self._closed = True
            streams, self._idle = self._idle + list(self._busy), []
        for stream in streams:
            stream.close(cancel=cancel)
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def conversation(self, conversation_id: int | None = None, system: str | None = None) -> "Conversation":
        return Conversation(self, conversation_id, system)

    def turn(self, conversation_id: int, messages: list[dict], start: bool = False, end: bool = False,
             resume: bool = False, max_tokens: int | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             options: dict | None = None) -> Iterator[TokenEvent | TurnResult]:
        """Send one turn; yields a :class:`TokenEvent` per reply token, then one :class:`TurnResult`.

        Raises :class:`ServerError` with the server's message on a refused request. Leaving the
        iteration early cancels the turn on the server.
        """
        inputs = []
        for spec, values in request_inputs(messages, max_tokens, temperature, top_k, top_p, seed, resume, options):
            t = self._grpc.InferInput(spec.name, list(values.shape), spec.dtype)
            t.set_data_from_numpy(values)
            inputs.append(t)
        request_id = f"{id(self)}-{next(self._ids)}"
        stream, reused = self._take()
        complete = False
        try:
            for attempt in range(2):
                try:
                    stream.client.async_stream_infer(self.model_name, inputs, request_id=request_id,
                                                     sequence_id=int(conversation_id), sequence_start=start,
                                                     sequence_end=end)
                    break
                except Exception as e:  # refused before sending: the stream broke since it was last used
                    self._give_back(stream, False)
                    if attempt or not reused:
                        raise ServerError(f"cannot send to the server at {self.url} ({e})", "unavailable") from None
                    stream, reused = self._take()
            while True:
                try:
                    result, error = stream.responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise ServerError(f"no response from the server within {self.timeout:.0f} s", "timeout") from None
                if error is not None:
                    raise _server_error(error)
                item = decode_response(result.as_numpy)
                if isinstance(item, TokenEvent):
                    yield item
                    continue
                complete = True
                yield item
                return
        finally:
            self._give_back(stream, complete)

    def end(self, conversation_id: int) -> None:
        """End a conversation: the server frees it and deletes its file."""
        for _ in self.turn(conversation_id, [], end=True):  # END with no messages: no turn
            pass


def new_conversation_id() -> int:
    """A random conversation id (a Triton correlation id: a nonzero uint64; 63 bits here)."""
    return secrets.randbits(63) or 1


class Conversation:
    """A conversation on the server: :meth:`send` one user message per turn."""

    def __init__(self, client: Client, conversation_id: int | None = None, system: str | None = None,
                 started: bool = False):
        self.client = client
        self.id = conversation_id if conversation_id is not None else new_conversation_id()
        self.system = system
        self.started = started
        self.last: TurnResult | None = None

    def tokens(self, text: str, **sampling) -> Iterator[TokenEvent]:
        """The reply to ``text``, token by token; :attr:`last` holds the turn's summary afterwards."""
        system = [{"role": "system", "content": self.system}] if not self.started and self.system else []
        yield from self.message_tokens(system + [{"role": "user", "content": text}], **sampling)

    def message_tokens(self, messages: list[dict], **sampling) -> Iterator[TokenEvent]:
        """The reply to ``messages``: any history ending with a user message for a conversation not
        yet started, exactly one user message for one that is.

        A continuation after a turn this object saw end carries that turn's stream length (OPTIONS
        ``after``): sent again after an error (a timeout, a broken connection, a failed save), it is
        fed only if the server did not apply it, else refused as ALREADY_DONE: never fed twice."""
        first, sent = not self.started, 0
        if not first and self.last is not None:
            sampling["options"] = dict(sampling.get("options") or {}, after=self.last.seen)
        try:
            try:
                for token in self._turn(messages, start=first, **sampling):
                    sent += 1
                    yield token
            except ServerError as e:
                if first or sent or e.kind != ErrorKind.SEQUENCE_RELEASED:
                    raise
                # Triton refused the turn before the model saw it: it released the sequence (idle, or a
                # restart). Continue the conversation saved on the server.
                yield from self._turn(messages, start=True, resume=True, **sampling)
        except ServerError as e:
            if e.kind is ErrorKind.ALREADY_DONE:
                self.last = None  # the server is past what this object saw: the next turn goes on from there
            raise
        except GeneratorExit:
            self.last = None  # left mid-reply: the server kept a reply of a length unknown here
            raise
        self.started = True

    def _turn(self, messages, **kw) -> Iterator[TokenEvent]:
        for item in self.client.turn(self.id, messages, **kw):
            if isinstance(item, TurnResult):
                self.last = item
            else:
                yield item

    def completion_tokens(self, text: str, **sampling) -> Iterator[TokenEvent]:
        """A continuation of ``text`` as it is (no chat template), token by token, on this
        conversation id used once: started and ended by this turn (OPTIONS ``raw``)."""
        options = dict(sampling.pop("options", None) or {}, raw=True)
        yield from self._turn(text, start=True, end=True, options=options, **sampling)

    def send(self, text: str, **sampling) -> Iterator[str]:
        """The reply to ``text`` as text pieces (the last may be text the server held back)."""
        for token in self.tokens(text, **sampling):
            yield token.text
        if self.last is not None and self.last.text:
            yield self.last.text

    def end(self) -> None:
        try:
            self.client.end(self.id)
        except ServerError as e:
            if e.kind != ErrorKind.SEQUENCE_RELEASED:
                raise
            for _ in self.client.turn(self.id, [], start=True, resume=True, end=True):
                pass
