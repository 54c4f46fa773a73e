"""OpenAI-compatible HTTP gateway: ``/v1/chat/completions`` (streamed and not) and ``/v1/models``.

A Starlette app served by uvicorn, forwarding every turn to Triton over gRPC. Clients of that API
resend the whole message list each turn; the gateway keys each conversation by the hash of its
message list so far (the replies included, as sent; see :mod:`.conversations`, persisted beside the
sessions), so a request whose messages extend a stored conversation by one user message feeds only
that message. Any other request starts a new conversation on the server, its whole history fed (in
chunks, however long). ``usage.prompt_tokens`` is the number of tokens the server fed for the
request's messages.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad request,
401 missing or wrong API key, 404 unknown model or route, 413 body over the limit (refused from its
Content-Length, or as soon as the streamed body passes the limit), 429 server busy and 503 server
unreachable (both with Retry-After), 500 internal error, 504 no response in time.
"""
from __future__ import annotations

import hmac
import json
import secrets
import threading
import time

from ..errors import UserError
from .conversations import Conversations, Reaper, conversation_key  # noqa: F401  (conversation_key: re-exported)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# ServerError.kind -> (HTTP status, OpenAI error type, code, Retry-After seconds)
_STATUS = {"invalid": (400, "invalid_request_error", None, None),
           "internal": (500, "server_error", "internal_error", None),
           "overloaded": (429, "server_error", "server_busy", 1),
           "unavailable": (503, "server_error", "server_unavailable", 5),
           "timeout": (504, "server_error", "timeout", None)}
_UNKNOWN = "unknown or has ended"


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _content(m, i) -> str:
    c = m.get("content")
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        c = "".join(p["text"] for p in c)
    if not isinstance(c, str):
        raise BadRequest(f"messages[{i}].content must be a string (or a list of text parts)", param=f"messages[{i}]")
    try:
        c.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
        raise BadRequest(f"messages[{i}].content holds a lone surrogate ({c[e.start]!r} at {e.start}), which is "
                         "not Unicode text", param=f"messages[{i}]") from None
    return c


def parse_request(body: dict, model_id: str, max_tokens_limit: int) -> dict:
    """Validate a chat-completions request body; returns messages and sampling settings."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("model") not in (None, model_id):
        raise BadRequest(f"model {body.get('model')!r} is not served here; use {model_id!r}", 404, "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {sorted(_ROLES)}", param=f"messages[{i}]")
        out.append({"role": _ROLES[m["role"]], "content": _content(m, i)})
    if out[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's", param="messages")
    if not out[-1]["content"].strip():
        raise BadRequest("the last user message is empty", param="messages")

    def number(name, kind, lo, hi, default):
        value = body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise BadRequest(f"{name} must be {'a number' if kind is float else 'an integer'}", param=name)
        if not lo <= value <= hi:
            raise BadRequest(f"{name} must be in [{lo}, {hi}], got {value}", param=name)
        return kind(value)

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = number("max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                            int, 1, max_tokens_limit, None)
    if number("n", int, 1, 1, 1) != 1:
        raise BadRequest("n must be 1", param="n")
    top_p = number("top_p", float, 0.0, 1.0, 1.0)
    if top_p == 0:
        raise BadRequest("top_p must be in (0, 1]", param="top_p")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", param="stream")
    if body.get("stop") not in (None, [], ""):
        raise BadRequest("stop sequences are not supported; the reply ends at the model's end-of-turn token",
                         param="stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", param="stream_options")
    return {
        "messages": out, "stream": stream, "include_usage": bool(options.get("include_usage")),
        "sampling": {"max_tokens": max_tokens, "temperature": number("temperature", float, 0.0, 2.0, 0.0),
                     "top_p": top_p, "top_k": number("top_k", int, 0, 1 << 30, 0),
                     "seed": number("seed", int, -(1 << 63), (1 << 63) - 1, 0)},
    }


def create_app(triton_url: str, model_id: str = "streaming-trt", max_tokens_limit: int = 4096,
               max_body_bytes: int = 256 * 1024, max_conversations: int = 4096, timeout: float = 300.0,
               api_key: str | None = None, state_dir: str | None = None, conversation_ttl: float = 24 * 3600.0,
               client=None, reap_interval: float | None = None):
    """The Starlette app forwarding to Triton's gRPC endpoint ``triton_url``.

    ``api_key``: every request must carry ``Authorization: Bearer KEY`` (and Triton is sent it).
    ``state_dir``: where the conversation map is kept (None: in memory only). ``client``: a
    :class:`~streaming_trt.client.Client` to use instead of one made for ``triton_url``.
    ``app.state.conversations`` / ``app.state.reaper`` are the map and its reaper thread.
    """
    from pathlib import Path

    import anyio
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from ..client import Client, Conversation, ServerError

    if client is None:
        client = Client(triton_url, timeout=timeout, api_key=api_key)

    def end_on_server(cid: int) -> None:
        try:
            Conversation(client, cid, started=True).end()
        except ServerError as e:
            if _UNKNOWN not in str(e):  # unknown: gone already (its session was reaped, or never saved)
                raise

    path = None if state_dir is None else Path(state_dir) / "openai-conversations.sqlite"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    conversations = Conversations(path, end_on_server, limit=max_conversations, ttl=conversation_ttl,
                                  busy_limit=max(6 * 3600.0, 2 * timeout))
    reaper = Reaper(conversations, reap_interval or min(60.0, conversation_ttl / 4)).start()
    expected = None if not api_key else f"Bearer {api_key}".encode()

    def error(message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error",
              code: str | None = None, retry_after: int | None = None):
        headers = None if retry_after is None else {"Retry-After": str(retry_after)}
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                            headers=headers)

    def server_error(e: Exception):
        if not isinstance(e, ServerError):
            return error(f"internal error: {type(e).__name__}: {e}", 500, kind="server_error", code="internal_error")
        status, kind, code, retry = _STATUS.get(e.kind, _STATUS["internal"])
        return error(str(e), status, kind=kind, code=code, retry_after=retry)

    class TurnStream(StreamingResponse):
        """A streamed reply whose turn is cancelled as soon as the response ends unfinished (the client
        left): Starlette only abandons the body's iterator, which would keep the turn until collected."""

        def __init__(self, turn, content, **kw):
            super().__init__(content, **kw)
            self.turn = turn

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                if not self.turn.done:
                    with anyio.CancelScope(shield=True):
                        await run_in_threadpool(self.turn.cancel)

    class Turn:
        """One request's turn; iterate for its reply's text pieces. The conversation map is settled
        when the iteration ends: recorded on success, dropped (ended on the server) otherwise."""

        def __init__(self, req):
            self.req, self.pieces, self.done, self.cancelled, self.iterator = req, [], False, False, None
            history = req["messages"][:-1]
            cid = conversations.take(history) if history else None
            if cid is None:
                self.conv, self.send = Conversation(client, conversations.new()), req["messages"]
            else:
                self.conv, self.send = Conversation(client, cid, started=True), req["messages"][-1:]

        def _tokens(self):
            tokens = self.conv.message_tokens(self.send, **self.req["sampling"])
            try:
                first = next(tokens, None)
            except ServerError as e:
                if self.send is self.req["messages"] or _UNKNOWN not in str(e):
                    raise
                # the server no longer has it (its TTL or disk budget): start over with the whole history
                conversations.drop(self.conv.id, on_server=False)
                self.conv, self.send = Conversation(client, conversations.new()), self.req["messages"]
                tokens = self.conv.message_tokens(self.send, **self.req["sampling"])
                first = next(tokens, None)
            if first is not None:
                yield first
                yield from tokens

        def __iter__(self):
            tokens = self._tokens()
            try:
                for token in tokens:
                    if self.cancelled:
                        return
                    self.pieces.append(token.text)
                    yield token.text
                self.done = True
                conversations.put(self.req["messages"] + [{"role": "assistant", "content": "".join(self.pieces)}],
                                  self.conv.id)
            finally:
                tokens.close()  # a client gone mid-stream: closing the gRPC stream cancels the turn
                if not self.done:
                    conversations.drop(self.conv.id)
                    reaper.wake()

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

        def usage(self):
            s = self.conv.last
            n = len(self.pieces)
            return {"prompt_tokens": s.prompt_tokens, "completion_tokens": n, "total_tokens": s.prompt_tokens + n}

    def authorized(request) -> bool:
        if expected is None:
            return True
        return hmac.compare_digest(request.headers.get("authorization", "").encode("utf-8", "replace"), expected)

    def unauthorized():
        return error("a valid API key is needed: send the header 'Authorization: Bearer KEY'", 401,
                     kind="authentication_error", code="invalid_api_key")

    async def read_body(request) -> bytes:
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
        if not authorized(request):
            return unauthorized()
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "streaming-trt"}]})

    async def completions(request):
        if not authorized(request):
            return unauthorized()
        try:
            body = await read_body(request)
            try:
                parsed = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"the request body is not valid JSON ({e})") from None
            except RecursionError:
                raise BadRequest("the request body is JSON nested too deeply") from None
            req = parse_request(parsed, model_id, max_tokens_limit)
        except BadRequest as e:
            return error(str(e), e.status, e.param)
        created, rid = int(time.time()), f"chatcmpl-{secrets.token_hex(12)}"
        try:
            turn = await run_in_threadpool(Turn, req)
        except Exception as e:  # the map's database failed: nothing reached the server
            return server_error(e)
        headers = {"x-streaming-trt-conversation": str(turn.conv.id)}
        pieces = turn.start()
        # Run the first step here, so a refused request gets an HTTP error and not a broken stream.
        try:
            first = await run_in_threadpool(next, pieces, None)
        except Exception as e:
            return server_error(e)
        finish = lambda: "length" if turn.conv.last and turn.conv.last.finish_reason == "length" else "stop"

        if not req["stream"]:
            def rest():
                return "".join(([first] if first is not None else []) + list(pieces))
            try:
                text = await run_in_threadpool(rest)
            except Exception as e:
                return server_error(e)
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish(), "logprobs": None}],
                "usage": turn.usage()}, headers=headers)

        def chunk(delta, finish_reason=None, **extra):
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                 "logprobs": None}]
            return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                          "model": model_id, "choices": choices, **extra}) + "\n\n"

        def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                if first is not None:
                    yield chunk({"content": first})
                    for piece in pieces:
                        yield chunk({"content": piece})
            except Exception as e:  # after the headers: the error goes in the stream, in OpenAI's shape
                yield "data: " + server_error(e).body.decode() + "\n\n"
                return
            yield chunk({}, finish())
            if req["include_usage"]:
                yield chunk(None, usage=turn.usage())
            yield "data: [DONE]\n\n"

        return TurnStream(turn, events(), media_type="text/event-stream", headers=headers)

    async def http_error(request, exc):
        return error(str(exc.detail), exc.status_code, kind="invalid_request_error")

    async def internal_error(request, exc):
        return server_error(exc)

    app = Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                            Route("/v1/chat/completions", completions, methods=["POST"])],
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.conversations, app.state.reaper, app.state.client = conversations, reaper, client
    return app


class GatewayThread:
    """uvicorn serving :func:`create_app` on ``host:port`` in a background thread."""

    def __init__(self, triton_url: str, host: str, port: int, **app_kwargs):
        try:
            import uvicorn
        except ImportError:
            raise UserError("the OpenAI gateway needs starlette and uvicorn: pip install 'streaming-trt[serve]'") from None
        self.app = create_app(triton_url, **app_kwargs)
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=3)
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
