"""OpenAI-compatible HTTP gateway: ``/v1/chat/completions`` and ``/v1/completions`` (streamed and
not) and ``/v1/models``. Which parameters are honoured and which refused: :mod:`.openai_api`.

A Starlette app served by uvicorn, forwarding every turn to Triton over gRPC. Clients of that API
resend the whole message list each turn; the gateway keys each conversation by the hash of its
message list so far (the replies included, as sent; see :mod:`.conversations`, persisted beside the
sessions), so a request whose messages extend a stored conversation by one user message feeds only
that message. Any other request starts a new conversation on the server, its whole history fed (in
chunks, however long). ``usage.prompt_tokens`` is the number of tokens the server fed for the
request's messages. ``/v1/completions`` continues a text as it is (no chat template): each
request is a conversation of its own, started and ended in one turn.

Chat turns are idempotent (:mod:`.conversations`): a request sent again, with the same
``Idempotency-Key`` header or (a continuation) the same messages, gets the recorded answer
(header ``x-streaming-trt-replayed: true``) and nothing is fed; a resend of a turn in flight, or a
continuation of its reply sent before it finished, waits for it instead of forking the conversation.

A chat request may name its conversation with an ``X-Session-ID`` header (1-128 characters of
letters, digits and ``._:-``; else 400): the conversation is then the session's, the same on every
replica sharing the session directory (:func:`.conversations.session_conversation`), so an L7
balancer hashing the header pins it to one replica, and any other replica continues it after a
failover. What it holds is recorded beside its session file (:class:`.conversations.SessionKeys`);
messages extending that history by one user message feed only that message, any other history
starts the session again from the whole history. Such conversations are never ended by the
gateway: the server's disk policy reaps them. A turn another replica is running answers 409
(``conversation_busy``, Retry-After).

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad request,
401 missing or wrong API key, 404 unknown model or route, 409 an Idempotency-Key sent again with
other messages, 413 body over the limit (refused from its Content-Length, or as soon as the streamed
body passes the limit); a turn's error has the status of its kind (:data:`.protocol.HTTP`): 400 bad
request, 404 unknown conversation, 409 a gRPC turn applied already, 429 server busy and 503
server unreachable or shutting down (both with Retry-After), 500 internal error, 504 no response in time.
The handlers share one :class:`Gateway` (``app.state.gateway``).
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import secrets
import threading
import time
from pathlib import Path

from ..contract import UserError

try:
    import anyio
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError:  # the [serve] extra
    raise UserError("the OpenAI gateway needs starlette and uvicorn: pip install 'streaming-trt[serve]'") from None

from .client import Client, Conversation, ServerError, new_conversation_id
from .conversations import (Conversations, Reaper, SessionKeys, conversation_key,  # noqa: F401  (re-exported)
                            session_conversation)
from .openai_api import (SESSION_HEADER, BadRequest, chat_logprobs, completion_logprobs, parse_chat, parse_completion,
                         parse_session_id)
from .protocol import HTTP, ErrorKind, TokenEvent

NOT_RUN = frozenset({ErrorKind.BUSY, ErrorKind.SHUTTING_DOWN, ErrorKind.SEQUENCE_RELEASED,  # turns refused unrun
                     ErrorKind.CONVERSATION_BUSY})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
HEADER_SECONDS = 10.0  # the request line and headers must arrive within this (slow-loris clients)
MAX_HEADER_BYTES = 16 * 1024  # request line and headers together
BODY_SECONDS = 30.0  # a request body that takes longer to arrive is refused (a slow client holds nothing)
MAX_IDEMPOTENCY_KEY = 255  # characters of an Idempotency-Key header
MAX_CONCURRENT_TURNS = 1024  # requests the gateway carries at once (the scheduler refuses beyond its queue)


@dataclasses.dataclass
class Gateway:
    """What every handler shares: ``request.app.state.gateway``."""

    client: Client
    conversations: Conversations
    reaper: Reaper
    model_id: str
    max_tokens_limit: int
    max_body_bytes: int
    expected_auth: bytes | None   # b"Bearer KEY", or None when no key is needed
    allowed_hosts: frozenset[str] = LOOPBACK_NAMES  # Host header names served ("*": any)
    allowed_origins: frozenset[str] = frozenset()   # Origin headers served ("*": any); none by default
    send_seconds: float = 30.0  # a streamed reply the client does not read for this long is cancelled
    resend_wait: float = 300.0  # a resend (or a continuation) of a turn in flight waits this long for it
    session_keys: SessionKeys = dataclasses.field(default_factory=lambda: SessionKeys(None))  # X-Session-ID


def create_app(triton_url: str, model_id: str = "streaming-trt", max_tokens_limit: int = 4096,
               max_body_bytes: int = 256 * 1024, max_conversations: int = 4096, timeout: float = 300.0,
               api_key: str | None = None, state_dir: str | None = None, conversation_ttl: float = 24 * 3600.0,
               client=None, reap_interval: float | None = None, allowed_hosts=(), allowed_origins=(),
               send_seconds: float = 30.0, session_dir: str | None = None):
    """The Starlette app forwarding to Triton's gRPC endpoint ``triton_url``.

    ``api_key``: every request must carry ``Authorization: Bearer KEY`` (and Triton is sent it).
    ``state_dir``: where this replica's conversation map is kept (None: in memory only), on a local
    disk: never the session directory (refused), which replicas may share. ``session_dir``: the
    server's session directory, where ``X-Session-ID`` conversations record what they hold (None:
    in memory). ``client``: a
    :class:`~streaming_trt.serving.client.Client` to use instead of one made for ``triton_url``.
    ``app.state.conversations`` / ``app.state.reaper`` are the map and its reaper thread;
    ``app.state.gateway`` is the :class:`Gateway` the handlers share. ``allowed_hosts``: Host
    names served besides the loopback ones (``"*"``: any; DNS rebinding needs a name not listed);
    ``allowed_origins``: browser Origins served (none by default: a web page cannot post here).
    """
    if client is None:
        client = Client(triton_url, timeout=timeout, api_key=api_key)
    path = None if state_dir is None else Path(state_dir) / "openai-conversations.sqlite"
    if path is not None and session_dir is not None and Path(state_dir).resolve() == Path(session_dir).resolve():
        raise UserError(f"the gateway's conversation map (SQLite) must not live in the session directory "
                        f"{session_dir}, which replicas may share (on NFS): give it a local directory")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conversations = Conversations(path, lambda cid: end_on_server(client, cid), limit=max_conversations,
                                  ttl=conversation_ttl, busy_limit=max(6 * 3600.0, 2 * timeout))
    reaper = Reaper(conversations, reap_interval or min(60.0, conversation_ttl / 4)).start()
    gateway = Gateway(client, conversations, reaper, model_id, max_tokens_limit, max_body_bytes,
                      None if not api_key else f"Bearer {api_key}".encode(),
                      LOOPBACK_NAMES | {h.lower() for h in allowed_hosts}, frozenset(allowed_origins), send_seconds,
                      resend_wait=timeout, session_keys=SessionKeys(session_dir))
    app = Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/v1/completions", text_completions, methods=["POST"])],
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.gateway = gateway
    app.state.conversations, app.state.reaper, app.state.client = conversations, reaper, client
    return app


def end_on_server(client: Client, cid: int) -> None:
    """End conversation ``cid`` on the server; one the server no longer has is gone already
    (its session was reaped, or never saved)."""
    try:
        Conversation(client, cid, started=True).end()
    except ServerError as e:
        if e.kind != ErrorKind.UNKNOWN_CONVERSATION:
            raise


# ----------------------------------------------------------------------------------- errors
def error(message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error",
          code: str | None = None, retry_after: int | None = None):
    headers = None if retry_after is None else {"Retry-After": str(retry_after)}
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def server_error(e: Exception):
    """An error of a turn in OpenAI's shape, its HTTP status from its kind (:data:`.protocol.HTTP`)."""
    if not isinstance(e, ServerError):
        return error(f"internal error: {type(e).__name__}: {e}", 500, kind="server_error", code="internal_error")
    http = HTTP[e.kind]
    return error(str(e), http.status, kind=http.type, code=http.code, retry_after=http.retry_after)


def unauthorized():
    return error("a valid API key is needed: send the header 'Authorization: Bearer KEY'", 401,
                 kind="authentication_error", code="invalid_api_key")


def host_name(header: str) -> str:
    """``"[::1]:8080" -> "::1"``, ``"Example.com:80" -> "example.com"``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def refused_at_the_door(gateway: Gateway, request, post: bool):
    """The error response for a request no browser page or misdirected name may make, else None:
    a Host not served (DNS rebinding), an Origin not allowed (a web page posting cross-site), a
    POST whose body is not declared JSON (an HTML form's text/plain needs no preflight)."""
    if "*" not in gateway.allowed_hosts and host_name(request.headers.get("host", "")) not in gateway.allowed_hosts:
        return error(f"Host {request.headers.get('host', '')!r} is not served here; start the server with "
                     "--allowed-hosts NAME to serve it", 421)
    origin = request.headers.get("origin")
    if origin is not None and "*" not in gateway.allowed_origins and origin not in gateway.allowed_origins:
        return error(f"Origin {origin!r} is not allowed; start the server with --allowed-origins {origin} "
                     "to let that page call it", 403)
    if post and request.headers.get("content-type", "").split(";", 1)[0].strip().lower() != "application/json":
        return error("the request body must be sent as Content-Type: application/json", 415)
    return None


def authorized(gateway: Gateway, request) -> bool:
    if gateway.expected_auth is None:
        return True
    return hmac.compare_digest(request.headers.get("authorization", "").encode("utf-8", "replace"),
                               gateway.expected_auth)


# ----------------------------------------------------------------------------------- one turn
class TurnStream(StreamingResponse):
    """A streamed reply whose turn is cancelled as soon as the response ends unfinished: the client
    left (Starlette only abandons the body's iterator, which would keep the turn until collected),
    or stopped reading for ``send_seconds`` (its socket full, each send would wait for hours)."""

    def __init__(self, turn, content, send_seconds: float, **kw):
        super().__init__(content, **kw)
        self.turn, self.send_seconds = turn, send_seconds

    async def __call__(self, scope, receive, send):
        async def bounded(message):
            with anyio.move_on_after(self.send_seconds) as waited:
                await send(message)
            if waited.cancelled_caught:
                raise ConnectionError(f"the client read nothing for {self.send_seconds:.0f} s")

        try:
            await super().__call__(scope, receive, bounded)
        except (ConnectionError, ClientDisconnect):
            pass  # the client is gone or stuck: nobody to answer
        finally:
            if not self.turn.done:
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(self.turn.cancel)


class Turn:
    """One request's turn; iterate for its reply's tokens (``TokenEvent``; the last may carry only
    text the server held back, id -1). A chat turn's conversation map is settled when the iteration
    ends: recorded on success, dropped (ended on the server) otherwise. A text completion is a
    conversation of its own, started and ended by its one turn."""

    def __init__(self, gateway: Gateway, req, idem: str | None = None):
        self.gateway, client, conversations = gateway, gateway.client, gateway.conversations
        self.req, self.pieces, self.done, self.cancelled, self.iterator = req, [], False, False, None
        self.count, self.kwargs = 0, dict(req["sampling"], options=req["options"] or None)
        self.idem, self.replay = idem, None
        self.session = req.get("session_id")
        if "prompt" in req:
            self.conv, self.send = Conversation(client, new_conversation_id()), req["prompt"]
            return
        messages, history, wait = req["messages"], req["messages"][:-1], gateway.resend_wait
        if self.session is not None:  # the client's conversation id: no map, the same on every replica
            cid = session_conversation(self.session)
            if history and gateway.session_keys.get(cid) == conversation_key(history):
                self.conv, self.send = Conversation(client, cid, started=True), messages[-1:]
            else:  # a new session, or another history: START replaces what the server holds
                self.conv, self.send = Conversation(client, cid), messages
            return
        answered = conversations.answered(messages, idem, wait=wait)
        if answered is not None:  # a resend: answered from the record, nothing fed
            self.conv, self.send, self.replay = Conversation(client, answered[0], started=True), None, answered[1]
            return
        cid = conversations.take(history, wait=wait) if history else None
        if cid is None:
            self.conv, self.send = Conversation(client, conversations.new()), messages
        else:
            self.conv, self.send = Conversation(client, cid, started=True), messages[-1:]
        conversations.begin(self.conv.id, messages, idem)

    def _tokens(self):
        if "prompt" in self.req:
            yield from self.conv.completion_tokens(self.send, **self.kwargs)
            return
        tokens = self.conv.message_tokens(self.send, **self.kwargs)
        try:
            first = next(tokens, None)
        except ServerError as e:
            if self.send is self.req["messages"] or e.kind != ErrorKind.UNKNOWN_CONVERSATION:
                raise
            # the server no longer has it (its TTL or disk budget): start over with the whole history
            if self.session is not None:
                self.conv, self.send = Conversation(self.gateway.client, self.conv.id), self.req["messages"]
                tokens = self.conv.message_tokens(self.send, **self.kwargs)
                first = next(tokens, None)
                if first is not None:
                    yield first
                    yield from tokens
                return
            conversations = self.gateway.conversations
            conversations.drop(self.conv.id, on_server=False)
            self.conv, self.send = Conversation(self.gateway.client, conversations.new()), self.req["messages"]
            conversations.begin(self.conv.id, self.req["messages"], self.idem)
            tokens = self.conv.message_tokens(self.send, **self.kwargs)
            first = next(tokens, None)
        if first is not None:
            yield first
            yield from tokens

    def __iter__(self):
        tokens, refused = self._tokens(), False
        try:
            for token in tokens:
                if self.cancelled:
                    return
                self.pieces.append(token.text)
                self.count += 1
                yield token
            tail = self.conv.last.text if self.conv.last is not None else ""
            if tail:
                self.pieces.append(tail)
                yield TokenEvent(-1, tail)
            self.done = True
            if self.session is not None:
                self.gateway.session_keys.put(
                    self.conv.id, self.req["messages"] + [{"role": "assistant", "content": "".join(self.pieces)}])
            elif "messages" in self.req:
                text = "".join(self.pieces)
                reply = {"text": text, "finish_reason": self.finish(), "usage": self.usage()}
                self.gateway.conversations.put(self.req["messages"] + [{"role": "assistant", "content": text}],
                                               self.conv.id, request=self.req["messages"], reply=reply, idem=self.idem)
        except ServerError as e:
            refused = e.kind in NOT_RUN
            raise
        finally:
            tokens.close()  # a client gone mid-stream: closing the gRPC stream cancels the turn
            if not self.done and self.session is not None:
                if not refused:  # what the server holds is no longer the recorded history
                    self.gateway.session_keys.drop(self.conv.id)
            elif not self.done and "messages" in self.req:
                if refused and self.send is not self.req["messages"]:
                    # refused before it ran (busy, restarting): the server holds the conversation as
                    # before, so a retry continues it instead of re-feeding the whole history
                    self.gateway.conversations.put(self.req["messages"][:-1], self.conv.id)
                else:
                    self.gateway.conversations.drop(self.conv.id)
                    self.gateway.reaper.wake()

    def start(self):
        self.iterator = iter(self)
        return self.iterator

    def cancel(self) -> None:
        """The HTTP client left: stop the turn (from any thread). A step running in another thread
        sees ``cancelled`` when its token arrives; a suspended one is closed here."""
        self.cancelled = True
        for _ in range(500):
            try:
                self.iterator.close()
                return
            except ValueError:  # "generator already executing": it stops at its next token
                time.sleep(0.01)

    def finish(self):
        return "length" if self.conv.last and self.conv.last.finish_reason == "length" else "stop"

    def usage(self):
        s, n = self.conv.last, self.count
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": n, "total_tokens": s.prompt_tokens + n}


# ----------------------------------------------------------------------------------- handlers
async def read_body(request, max_body_bytes: int) -> bytes:
    """The body, refused (413) from its Content-Length or once the bytes streamed in pass the limit."""
    too_big = f"more than this server's limit of {max_body_bytes} bytes; send a shorter message"
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise BadRequest(f"Content-Length {length!r} is not a number of bytes")
        if int(length) > max_body_bytes:
            raise BadRequest(f"the request is {int(length)} bytes, {too_big}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise BadRequest(f"the request is over {max_body_bytes} bytes, {too_big}", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def models(request):
    gateway = request.app.state.gateway
    refused = refused_at_the_door(gateway, request, post=False)
    if refused is not None:
        return refused
    if not authorized(gateway, request):
        return unauthorized()
    return JSONResponse({"object": "list", "data": [
        {"id": gateway.model_id, "object": "model", "created": 0, "owned_by": "streaming-trt"}]})


def logprobs_of(tokens, chat: bool, offset: int = 0):
    """The choice's ``logprobs`` object for ``tokens`` (those the server reported logprobs for)."""
    entries = [(t.text, t.logprob, t.top) for t in tokens if t.logprob is not None]
    return chat_logprobs(entries) if chat else completion_logprobs(entries, offset)


async def respond(request, chat: bool):
    gateway = request.app.state.gateway
    model_id = gateway.model_id
    # Every turn in flight waits for its tokens in a worker thread: anyio's default of 40 threads
    # would queue the 41st concurrent request behind the others, so the limit follows the server's.
    limiter = anyio.to_thread.current_default_thread_limiter()
    if limiter.total_tokens < MAX_CONCURRENT_TURNS:
        limiter.total_tokens = MAX_CONCURRENT_TURNS
    refused = refused_at_the_door(gateway, request, post=True)
    if refused is not None:
        return refused
    if not authorized(gateway, request):
        return unauthorized()
    try:
        with anyio.fail_after(BODY_SECONDS):
            body = await read_body(request, gateway.max_body_bytes)
        try:
            parsed = json.loads(body)
        except ValueError as e:  # not JSON, not UTF-8, or an integer of thousands of digits
            raise BadRequest(f"the request body is not valid JSON ({e})") from None
        except RecursionError:
            raise BadRequest("the request body is JSON nested too deeply") from None
        req = (parse_chat if chat else parse_completion)(parsed, model_id, gateway.max_tokens_limit)
        session = parse_session_id(request.headers.get(SESSION_HEADER))
        if chat:
            req["session_id"] = session
    except BadRequest as e:
        return error(str(e), e.status, e.param)
    except TimeoutError:
        return error(f"the request body took more than {BODY_SECONDS:.0f} s to arrive", 408)
    created = int(time.time())
    rid = f"chatcmpl-{secrets.token_hex(12)}" if chat else f"cmpl-{secrets.token_hex(12)}"
    idem = request.headers.get("idempotency-key")
    if idem is not None and not (0 < len(idem) <= MAX_IDEMPOTENCY_KEY and idem.isascii() and idem.isprintable()):
        return error(f"the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters",
                     400, param="Idempotency-Key")
    try:
        turn = await run_in_threadpool(Turn, gateway, req, idem if chat else None)
    except ValueError as e:  # an Idempotency-Key sent again with other messages
        return error(str(e), 409, param="Idempotency-Key", code="idempotency_key_reused")
    except Exception as e:  # the map's database failed: nothing reached the server
        return server_error(e)
    if turn.replay is not None:
        return replayed(turn, req, rid, created, model_id)
    tokens = turn.start()
    # Run the first step here, so a refused request gets an HTTP error and not a broken stream.
    try:
        first = await run_in_threadpool(next, tokens, None)
    except Exception as e:
        return server_error(e)
    headers = {"x-streaming-trt-conversation": str(turn.conv.id)}  # after a restart, the new conversation
    wants_logprobs = req["logprobs"] is not None
    kind = "chat.completion" if chat else "text_completion"

    if not req["stream"]:
        def rest():
            try:
                return ([first] if first is not None else []) + list(tokens), None
            except Exception as e:  # returned, not raised: the task group below would wrap it
                return None, e

        async def cancel_when_gone():  # nobody waits for a reply whose client left
            while not await request.is_disconnected():
                await anyio.sleep(0.25)
            await run_in_threadpool(turn.cancel)

        async with anyio.create_task_group() as watch:
            watch.start_soon(cancel_when_gone)
            reply, failed = await run_in_threadpool(rest)
            watch.cancel_scope.cancel()
        if failed is not None:
            return server_error(failed)
        text = "".join(t.text for t in reply)
        choice = {"index": 0, "finish_reason": turn.finish(),
                  "logprobs": logprobs_of(reply, chat) if wants_logprobs else None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": model_id,
                             "choices": [choice], "usage": turn.usage()}, headers=headers)

    emitted = 0  # characters streamed so far: the legacy logprobs' text_offset

    def chunk(token=None, finish_reason=None, delta=None, usage=None):
        nonlocal emitted
        choices = []
        if usage is None:
            text = "" if token is None else token.text
            logprobs = None
            if wants_logprobs and token is not None and token.logprob is not None:
                logprobs = logprobs_of([token], chat, emitted)
            emitted += len(text)
            choice = {"index": 0, "finish_reason": finish_reason, "logprobs": logprobs}
            if chat:
                choice["delta"] = delta if delta is not None else ({"content": text} if token is not None else {})
            else:
                choice["text"] = text
            choices = [choice]
        extra = {} if usage is None else {"usage": usage}
        return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk" if chat else kind,
                                      "created": created, "model": model_id, "choices": choices,
                                      **extra}) + "\n\n"

    def events():
        try:
            if chat:
                yield chunk(delta={"role": "assistant", "content": ""})
            if first is not None:
                yield chunk(first)
                for token in tokens:
                    yield chunk(token)
        except Exception as e:  # after the headers: the error goes in the stream, in OpenAI's shape
            yield "data: " + server_error(e).body.decode() + "\n\n"
            return
        yield chunk(finish_reason=turn.finish())
        if req["include_usage"]:
            yield chunk(usage=turn.usage())
        yield "data: [DONE]\n\n"

    return TurnStream(turn, events(), gateway.send_seconds, media_type="text/event-stream", headers=headers)


def replayed(turn: Turn, req, rid: str, created: int, model_id: str):
    """The recorded answer to a resent chat turn (nothing is fed): the same text, finish reason and
    usage, marked by the header ``x-streaming-trt-replayed: true`` (logprobs are not recorded)."""
    reply = turn.replay
    headers = {"x-streaming-trt-conversation": str(turn.conv.id), "x-streaming-trt-replayed": "true"}
    if not req["stream"]:
        choice = {"index": 0, "finish_reason": reply["finish_reason"], "logprobs": None,
                  "message": {"role": "assistant", "content": reply["text"]}}
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model_id,
                             "choices": [choice], "usage": reply["usage"]}, headers=headers)

    def chunk(delta, finish_reason=None, usage=None):
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                 "logprobs": None}]}
        return "data: " + json.dumps(dict(body, usage=usage) if usage else body) + "\n\n"

    events = [chunk({"role": "assistant", "content": ""}), chunk({"content": reply["text"]}),
              chunk({}, reply["finish_reason"])]
    if req["include_usage"]:
        events.append(chunk(None, usage=reply["usage"]))
    return StreamingResponse(iter(events + ["data: [DONE]\n\n"]), media_type="text/event-stream", headers=headers)


async def chat_completions(request):
    return await respond(request, chat=True)


async def text_completions(request):
    return await respond(request, chat=False)


async def http_error(request, exc):
    return error(str(exc.detail), exc.status_code, kind="invalid_request_error")


async def internal_error(request, exc):
    return server_error(exc)


def header_limited_h11(header_seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request line and headers are not all in
    ``header_seconds`` after it opened or after its previous response (uvicorn has no header timeout:
    a client sending a byte of headers at a time would hold its connection for ever)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderLimitedH11(H11Protocol):
        header_timer = None

        def _arm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(header_seconds, self._headers_late)

        def _headers_late(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no request is running on it: nothing to cancel

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

    return HeaderLimitedH11


class GatewayThread:
    """uvicorn serving :func:`create_app` on ``host:port`` in a background thread; a connection's
    request headers must arrive within ``header_seconds`` (at most ``MAX_HEADER_BYTES``), its body
    within :data:`BODY_SECONDS`, and an idle keep-alive connection is closed after 5 s."""

    def __init__(self, triton_url: str, host: str, port: int, header_seconds: float = HEADER_SECONDS, **app_kwargs):
        try:
            import uvicorn  # the [serve] extra, needed only to serve
        except ImportError:
            raise UserError("the OpenAI gateway needs starlette and uvicorn: pip install 'streaming-trt[serve]'") from None
        self.app = create_app(triton_url, **app_kwargs)
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=3, limit_concurrency=MAX_CONCURRENT_TURNS + 64,
                                timeout_keep_alive=5, http=header_limited_h11(header_seconds),
                                h11_max_incomplete_event_size=MAX_HEADER_BYTES)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise UserError("the OpenAI gateway did not start (is the port free?)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.reaper.stop()
        self.app.state.client.close(cancel=True)
        self.app.state.conversations.close()
