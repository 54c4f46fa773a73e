"""OpenAI-compatible HTTP gateway: ``/v1/chat/completions`` (streamed and not) and ``/v1/models``.

A Starlette app served by uvicorn, forwarding every turn to Triton over gRPC. Clients of that API
resend the whole message list each turn; the gateway keys each conversation by the hash of its
message list so far (the replies included, as sent), so a request whose messages extend a stored
conversation by one user message feeds only that message. Any other request starts a new
conversation on the server, its whole history fed (in chunks, however long). ``usage.prompt_tokens``
is the number of tokens the server fed for the request's messages.
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import OrderedDict

from ..errors import UserError

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def conversation_key(messages: list[dict]) -> str:
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _content(m, i) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise BadRequest(f"messages[{i}].content must be a string (or a list of text parts)", param=f"messages[{i}]")


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


class Conversations:
    """Message-list hash -> conversation id, bounded (the oldest are ended on the server)."""

    def __init__(self, limit: int = 4096):
        self.limit, self.lock, self.map = limit, threading.Lock(), OrderedDict()

    def take(self, messages: list[dict]) -> int | None:
        """The conversation whose messages are ``messages`` (removed: one request continues it)."""
        with self.lock:
            return self.map.pop(conversation_key(messages), None)

    def put(self, messages: list[dict], cid: int) -> list[int]:
        """Store; returns the ids pushed out (to end on the server)."""
        with self.lock:
            self.map[conversation_key(messages)] = cid
            dropped = []
            while len(self.map) > self.limit:
                dropped.append(self.map.popitem(last=False)[1])
            return dropped


def create_app(triton_url: str, model_id: str = "streaming-trt", max_tokens_limit: int = 4096,
               max_body_bytes: int = 256 * 1024, max_conversations: int = 4096, timeout: float = 300.0):
    """The Starlette app forwarding to Triton's gRPC endpoint ``triton_url``."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from ..client import Client, ServerError

    conversations = Conversations(max_conversations)

    def error(message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)

    def end_quietly(cids):
        for cid in cids:
            try:
                with Client(triton_url, timeout=timeout) as c:
                    c.end(cid)
            except Exception:  # already gone: nothing to free
                pass

    class Turn:
        """One request's turn: opens its own gRPC stream; iterate for (token_text) pieces."""

        def __init__(self, req):
            from ..client import Conversation

            self.req = req
            history = req["messages"][:-1]
            cid = conversations.take(history)
            self.client = Client(triton_url, timeout=timeout)
            if cid is None:
                self.conv = Conversation(self.client, random.getrandbits(63) or 1)
                self.send = req["messages"]
            else:
                self.conv = Conversation(self.client, cid, started=True)
                self.send = req["messages"][-1:]
            self.pieces, self.done = [], False

        def __iter__(self):
            try:
                for token in self.conv.message_tokens(self.send, **self.req["sampling"]):
                    self.pieces.append(token.text)
                    yield token.text
                self.done = True
                reply = {"role": "assistant", "content": "".join(self.pieces)}
                dropped = conversations.put(self.req["messages"] + [reply], self.conv.id)
                if dropped:
                    threading.Thread(target=end_quietly, args=(dropped,), daemon=True).start()
            finally:
                self.client.close(cancel=not self.done)  # a client gone mid-stream cancels the turn

        def usage(self):
            s = self.conv.last
            n = len(self.pieces)
            return {"prompt_tokens": s.prompt_tokens, "completion_tokens": n, "total_tokens": s.prompt_tokens + n}

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "streaming-trt"}]})

    async def completions(request):
        body = await request.body()
        if len(body) > max_body_bytes:
            return error(f"the request is {len(body)} bytes, more than this server's limit of {max_body_bytes}; "
                         "send a shorter message", 413)
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(f"the request body is not valid JSON ({e})")
        try:
            req = parse_request(parsed, model_id, max_tokens_limit)
        except BadRequest as e:
            return error(str(e), e.status, e.param)
        created, rid = int(time.time()), f"chatcmpl-{random.getrandbits(64):016x}"
        try:
            turn = await run_in_threadpool(Turn, req)
        except Exception as e:  # the server cannot be reached
            return error(f"the inference server is unavailable ({e})", 503, kind="server_error")
        headers = {"x-streaming-trt-conversation": str(turn.conv.id)}
        pieces = iter(turn)
        # Run the first step here, so a refused request gets an HTTP error and not a broken stream.
        try:
            first = await run_in_threadpool(next, pieces, None)
        except ServerError as e:
            return error(str(e))
        finish = lambda: "length" if turn.conv.last and turn.conv.last.finish_reason == "length" else "stop"

        if not req["stream"]:
            def rest():
                return "".join(([first] if first is not None else []) + list(pieces))
            try:
                text = await run_in_threadpool(rest)
            except ServerError as e:
                return error(str(e))
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
            yield chunk({"role": "assistant", "content": ""})
            try:
                if first is not None:
                    yield chunk({"content": first})
                    for piece in pieces:
                        yield chunk({"content": piece})
            except ServerError as e:
                yield "data: " + json.dumps({"error": {"message": str(e), "type": "server_error"}}) + "\n\n"
                return
            yield chunk({}, finish())
            if req["include_usage"]:
                yield chunk(None, usage=turn.usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                             Route("/v1/chat/completions", completions, methods=["POST"])])


class GatewayThread:
    """uvicorn serving :func:`create_app` on ``host:port`` in a background thread."""

    def __init__(self, triton_url: str, host: str, port: int, **app_kwargs):
        try:
            import uvicorn
        except ImportError:
            raise UserError("the OpenAI gateway needs starlette and uvicorn: pip install 'streaming-trt[serve]'") from None
        config = uvicorn.Config(create_app(triton_url, **app_kwargs), host=host, port=port, log_level="warning",
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
