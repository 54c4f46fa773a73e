"""What the OpenAI-compatible gateway accepts: every parameter of ``/v1/chat/completions`` and
``/v1/completions``, honoured or refused by name, and the response pieces built from the server's
per-token outputs (``logprobs``).

:data:`PARAMETERS` is the one list of parameters and their fate; docs/serving.md's table is checked
against it. A request is parsed into the Triton inputs: scalar sampling inputs (``MAX_TOKENS``,
``TEMPERATURE``, ``TOP_K``, ``TOP_P``, ``SEED``) and the ``OPTIONS`` JSON object (the other
SamplingParams fields, ``stop``, ``logprobs``, ``raw``).
"""
from __future__ import annotations

import dataclasses
import math

from ..contract import UserError
from ..runtime.generation import MAX_STOP_CHARS, MAX_STOP_STRINGS
from ..runtime.sampling import SamplingParams

CHAT, COMPLETIONS = "chat", "completions"
BOTH = (CHAT, COMPLETIONS)
MAX_TOP_LOGPROBS = 20    # alternatives per token (what the server computes at most)
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


SESSION_HEADER = "x-session-id"  # a client's conversation id: what an L7 balancer hashes to pin conversations
MAX_SESSION_ID = 128
_SESSION_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


class BadRequest(Exception):
    """A request refused with OpenAI's error shape: HTTP ``status``, naming ``param``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


# name -> (endpoints, fate, why / how). Fates: "honoured"; "accepted" (takes no part in generating
# the reply: bookkeeping for the provider, or a switch whose only meaningful value is the one
# served); "refused" (refused unless the value is the neutral one, which :data:`NEUTRAL` lists).
PARAMETERS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "model": (BOTH, "honoured", "must be the served model's id (or absent)"),
    "messages": ((CHAT,), "honoured",
                 "system / developer / user / assistant text (or text parts); the last is the user's"),
    "prompt": ((COMPLETIONS,), "honoured", "one string, continued as is (no chat template)"),
    "max_tokens": (BOTH, "honoured", "default: the server's --max-new-tokens"),
    "max_completion_tokens": ((CHAT,), "honoured", "as max_tokens"),
    "temperature": (BOTH, "honoured", "0-2; default 0 (greedy) here, OpenAI's is 1"),
    "top_p": (BOTH, "honoured", "(0, 1]"),
    "top_k": (BOTH, "honoured", "extension (vLLM): 0 or -1 is off"),
    "min_p": (BOTH, "honoured", "extension (vLLM): [0, 1]"),
    "repetition_penalty": (BOTH, "honoured", "extension (vLLM): > 0, 1 is off"),
    "frequency_penalty": (BOTH, "honoured", "[-2, 2], over the stream's recent tokens (SamplingParams)"),
    "presence_penalty": (BOTH, "honoured", "[-2, 2], over the stream's recent tokens (SamplingParams)"),
    "seed": (BOTH, "honoured", "default 0, so equal requests get equal replies"),
    "stop": (BOTH, "honoured", f"a string or up to {MAX_STOP_STRINGS} of up to {MAX_STOP_CHARS} characters; the reply ends before it, finish_reason stop"),
    "stream": (BOTH, "honoured", "server-sent events, one chunk per token"),
    "stream_options": (BOTH, "honoured", "include_usage: a last chunk with usage"),
    "logprobs": (BOTH, "honoured", f"chat: true/false; completions: 0-{MAX_TOP_LOGPROBS} alternatives per token"),
    "top_logprobs": ((CHAT,), "honoured", f"0-{MAX_TOP_LOGPROBS}, with logprobs true"),
    "n": (BOTH, "refused", "one choice per request (each is a stream of its own): send n requests"),
    "best_of": ((COMPLETIONS,), "refused", "one candidate per request"),
    "echo": ((COMPLETIONS,), "refused",
             "the prompt's own logprobs are not computed (the server returns reply tokens only)"),
    "suffix": ((COMPLETIONS,), "refused", "no fill-in-the-middle"),
    "logit_bias": (BOTH, "refused", "not implemented in the sampler"),
    "tools": ((CHAT,), "refused", "no tool calling"),
    "tool_choice": ((CHAT,), "refused", "no tool calling (\"none\" is accepted)"),
    "functions": ((CHAT,), "refused", "no function calling"),
    "function_call": ((CHAT,), "refused", "no function calling (\"none\" is accepted)"),
    "parallel_tool_calls": ((CHAT,), "accepted", "without tools there is nothing to call"),
    "response_format": ((CHAT,), "refused", "no JSON mode or schemas ({\"type\": \"text\"} is accepted)"),
    "audio": ((CHAT,), "refused", "text only"),
    "modalities": ((CHAT,), "refused", "text only ([\"text\"] is accepted)"),
    "prediction": ((CHAT,), "refused", "no predicted outputs"),
    "reasoning_effort": ((CHAT,), "refused", "not a reasoning model setting this server has"),
    "verbosity": ((CHAT,), "refused", "no verbosity control"),
    "web_search_options": ((CHAT,), "refused", "no web search"),
    "store": ((CHAT,), "refused", "replies are not stored for later retrieval (false is accepted)"),
    "metadata": ((CHAT,), "accepted", "bookkeeping; nothing is stored"),
    "service_tier": (BOTH, "refused", "one tier (\"auto\" and \"default\" are accepted)"),
    "user": (BOTH, "accepted", "an end-user id for the provider's bookkeeping"),
    "safety_identifier": ((CHAT,), "accepted", "an end-user id for the provider's bookkeeping"),
    "prompt_cache_key": ((CHAT,), "accepted", "caching is by conversation prefix here, automatically"),
}

NEUTRAL = {  # refused parameters: the values that ask for nothing
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logit_bias": ({},), "tools": ([],),
    "tool_choice": ("none",), "functions": ([],), "function_call": ("none",), "response_format": ({"type": "text"},),
    "modalities": (["text"],), "store": (False,), "service_tier": ("auto", "default"),
}


def _check_parameters(body: dict, endpoint: str) -> None:
    for name, value in body.items():
        entry = PARAMETERS.get(name)
        if entry is None or endpoint not in entry[0]:
            where = "/v1/chat/completions" if endpoint == CHAT else "/v1/completions"
            raise BadRequest(f"unknown parameter {name!r} for {where} (docs/serving.md lists every parameter)",
                             param=name)
        if entry[1] == "refused" and value is not None and not any(
                value == v and type(value) is type(v) for v in NEUTRAL.get(name, ())):
            raise BadRequest(f"{name} is not supported here: {entry[2]}", param=name)


def _number(body, name, kind, lo, hi, default, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise BadRequest(f"{name} must be {'a number' if kind is float else 'an integer'}", param=name)
    if not (lo < value if lo_open else lo <= value) or not value <= hi or (kind is float and math.isnan(value)):
        raise BadRequest(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", param=name)
    return kind(value)


def _sampling(body: dict, endpoint: str, max_tokens_limit: int) -> dict:
    """The common part: scalar inputs, OPTIONS, stream settings."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise BadRequest("stream_options must be an object", param="stream_options")
        if not stream:
            raise BadRequest("stream_options is only allowed with stream: true", param="stream_options")
        for key, value in stream_options.items():
            if key != "include_usage" and value not in (None, False):
                raise BadRequest(f"stream_options.{key} is not supported (only include_usage)", param="stream_options")
        if not isinstance(stream_options.get("include_usage", False), bool):
            raise BadRequest("stream_options.include_usage must be true or false", param="stream_options")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    scalar = {"max_tokens": _number(body, name, int, 1, max_tokens_limit, None),
              "temperature": _number(body, "temperature", float, 0.0, 2.0, 0.0),
              "top_p": _number(body, "top_p", float, 0.0, 1.0, 1.0, lo_open=True),
              "top_k": max(0, _number(body, "top_k", int, -1, 1 << 30, 0)),
              "seed": _number(body, "seed", int, -(1 << 63), (1 << 63) - 1, 0)}
    options = {}
    for key, lo, hi, off, lo_open in (("min_p", 0.0, 1.0, 0.0, False),
                                      ("repetition_penalty", 0.0, 1e6, 1.0, True),
                                      ("frequency_penalty", -2.0, 2.0, 0.0, False),
                                      ("presence_penalty", -2.0, 2.0, 0.0, False)):
        value = _number(body, key, float, lo, hi, off, lo_open)
        if value != off:
            options[key] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop must be a string or a list of strings", param="stop")
        if len(stops) > MAX_STOP_STRINGS:
            raise BadRequest(f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise BadRequest(f"a stop string is longer than {MAX_STOP_CHARS} characters", param="stop")
        stops = [s for s in stops if s]
        for s in stops:
            _unicode(s, "stop")
        if stops:
            options["stop"] = stops
    logprobs = _logprobs(body, endpoint)
    if logprobs is not None:
        options["logprobs"] = logprobs
    fields = {k: v for k, v in {**scalar, **options}.items() if k in SAMPLING_FIELDS}
    try:  # as the sampler will compute with them (float32): 1e-300 is 0 there
        SamplingParams(**fields)
    except UserError as e:
        raise BadRequest(str(e), param=str(e).split(" ", 1)[0]) from None
    return {"stream": stream, "include_usage": bool((stream_options or {}).get("include_usage")),
            "sampling": scalar, "options": options, "logprobs": logprobs}


def _logprobs(body: dict, endpoint: str) -> int | None:
    """Alternatives per token to report (0: the chosen token's only), None for no logprobs."""
    value = body.get("logprobs")
    if endpoint == COMPLETIONS:
        return _number(body, "logprobs", int, 0, MAX_TOP_LOGPROBS, None)
    if value is not None and not isinstance(value, bool):
        raise BadRequest("logprobs must be true or false", param="logprobs")
    top = _number(body, "top_logprobs", int, 0, MAX_TOP_LOGPROBS, None)
    if top is not None and not value:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if value else None


def _model(body: dict, model_id: str) -> None:
    if body.get("model") not in (None, model_id):
        raise BadRequest(f"model {body.get('model')!r} is not served here; use {model_id!r}", 404, "model")


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        c = "".join(p["text"] for p in c)
    if not isinstance(c, str):
        raise BadRequest(f"messages[{i}].content must be a string or a list of text parts (text only here)",
                         param=f"messages[{i}].content")
    _unicode(c, f"messages[{i}].content")
    return c


def _unicode(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
        raise BadRequest(f"{param} holds a lone surrogate ({text[e.start]!r} at {e.start}), which is not Unicode "
                         "text", param=param) from None


def parse_session_id(value: str | None) -> str | None:
    """The ``X-Session-ID`` header's conversation id (None when absent): 1 to 128 characters of
    letters, digits and ``. _ : -``, else :class:`BadRequest` (400)."""
    if value is None:
        return None
    if not 0 < len(value) <= MAX_SESSION_ID or not set(value) <= _SESSION_CHARS:
        raise BadRequest(f"the X-Session-ID header must be 1 to {MAX_SESSION_ID} characters of letters, digits and "
                         f"'._:-' (a conversation id of your choosing, e.g. a UUID); got {value[:40]!r}"
                         + ("..." if len(value) > 40 else ""), param="X-Session-ID")
    return value


def parse_chat(body, model_id: str, max_tokens_limit: int) -> dict:
    """A ``/v1/chat/completions`` body -> ``messages`` (role, content), ``sampling`` (scalar
    inputs), ``options`` (the OPTIONS object), ``logprobs``, ``stream``, ``include_usage``."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _check_parameters(body, CHAT)
    _model(body, model_id)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            why = " (no tool calling here)" if role in ("tool", "function") else ""
            raise BadRequest(f"messages[{i}].role must be one of {sorted(_ROLES)}{why}", param=f"messages[{i}].role")
        for key in ("tool_calls", "function_call", "audio"):
            if m.get(key):
                raise BadRequest(f"messages[{i}].{key} is not supported (text only, no tool calling)",
                                 param=f"messages[{i}].{key}")
        out.append({"role": _ROLES[m["role"]], "content": _content(m, i)})
    if out[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's", param="messages")
    if not out[-1]["content"].strip():
        raise BadRequest("the last user message is empty", param="messages")
    return {"messages": out, **_sampling(body, CHAT, max_tokens_limit)}


def parse_completion(body, model_id: str, max_tokens_limit: int) -> dict:
    """A ``/v1/completions`` body -> ``prompt`` (text) and the rest as :func:`parse_chat`; the
    OPTIONS object asks for a raw-text turn (``"raw": true``)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _check_parameters(body, COMPLETIONS)
    _model(body, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise BadRequest(f"prompt holds {len(prompt)} prompts; send one request per prompt", param="prompt")
    if isinstance(prompt, list) and prompt:
        raise BadRequest("prompt must be text; token-id prompts are not supported", param="prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string", param="prompt")
    _unicode(prompt, "prompt")
    parsed = {"prompt": prompt, **_sampling(body, COMPLETIONS, max_tokens_limit)}
    parsed["options"]["raw"] = True
    return parsed


# --- responses ------------------------------------------------------------------------------------------


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", "surrogatepass"))


def chat_logprobs(tokens) -> dict:
    """``tokens``: ``(text, logprob, top)`` per reply token, ``top`` as the server's
    ``[[token_id, text, logprob], ...]`` -> a chat choice's ``logprobs`` object."""
    return {"content": [{"token": text, "logprob": logprob, "bytes": _utf8(text),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": _utf8(t)} for _, t, lp in top or []]}
                        for text, logprob, top in tokens],
            "refusal": None}


def completion_logprobs(tokens, offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object for ``tokens`` (as :func:`chat_logprobs`);
    ``offset``: characters of the reply before the first of them (for ``text_offset``)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for text, logprob, top in tokens:
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        best: dict[str, float] = {}
        for _, t, lp in top or []:
            best.setdefault(t, lp)  # two ids may decode to the same text: the likelier is kept
        out["top_logprobs"].append(best)
        out["text_offset"].append(offset)
        offset += len(text)
    return out
