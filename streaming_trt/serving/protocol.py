"""The wire between a front door and the engine: the one home of the serving protocol.

- the Triton model's name and tensors (:data:`INPUTS`, :data:`OUTPUTS`, :data:`CONTROLS`): what
  ``config.pbtxt`` declares (:mod:`.repo`), what the Triton model reads and writes (:mod:`.tritonserver_model`)
  and what :mod:`streaming_trt.serving.client` sends and reads;
- the records: :class:`TurnRequest` (one turn, parsed and validated once, when it is made),
  :class:`TokenEvent` (one reply token) and :class:`TurnResult` (the turn's end);
- errors: :class:`ErrorKind` codes carried on the wire in a structured payload
  (:func:`encode_error` / :func:`decode_error`), never recognised by their wording, and
  :data:`HTTP` (the gateway's status for each kind).

Text tensors are UINT8 (UTF-8 bytes) rather than BYTES: the wheel's backend stub mishandles
numpy 2 arrays (docs/serving.md).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Callable

import numpy as np

from ..contract import UserError
from ..runtime.generation import stop_strings
from ..runtime.sampling import SamplingParams

MODEL_NAME = "streaming_llm"
MAX_OPTIONS_BYTES = 64 * 1024  # the OPTIONS JSON: sampling fields, stop strings (16 x 1024 characters), flags


# ----------------------------------------------------------------------------------- tensors
@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of the model: Triton ``dtype`` (``UINT8`` ...), ``dims`` and the numpy dtype that carries it."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False
    meaning: str = ""

    @property
    def numpy(self) -> str:
        return _NUMPY[self.dtype]


_NUMPY = {"UINT8": "uint8", "INT32": "int32", "INT64": "int64", "FP32": "float32", "BOOL": "bool", "UINT64": "uint64"}

INPUTS = (
    Tensor("MESSAGES", "UINT8", (-1,), meaning="UTF-8 JSON list of {role, content} (a JSON string with raw)"),
    Tensor("MAX_TOKENS", "INT32", (1,), True, "reply length (default: the server's)"),
    Tensor("TEMPERATURE", "FP32", (1,), True, "0 is greedy"),
    Tensor("TOP_K", "INT32", (1,), True, "0 keeps every token"),
    Tensor("TOP_P", "FP32", (1,), True, "nucleus"),
    Tensor("SEED", "INT64", (1,), True, "default 0"),
    Tensor("RESUME", "BOOL", (1,), True, "with START: continue the conversation saved under this id"),
    Tensor("OPTIONS", "UINT8", (-1,), True, "UTF-8 JSON object: SamplingParams fields, stop, logprobs, raw"),
)
OUTPUTS = (
    Tensor("TOKEN_ID", "INT64", (1,), meaning="the reply token, -1 on the last response"),
    Tensor("TEXT", "UINT8", (-1,), meaning="the token's text; on the last response, text held back till the end"),
    Tensor("PROMPT_TOKENS", "INT32", (1,), meaning="last response: tokens fed for the messages"),
    Tensor("COMPLETION_TOKENS", "INT32", (1,), meaning="last response: tokens generated (a stop token included)"),
    Tensor("SEEN", "INT64", (1,), meaning="last response: the stream's length"),
    Tensor("FINISH", "UINT8", (-1,), meaning="last response: stop / length / cancelled / ended"),
    Tensor("LOGPROB", "FP32", (1,), meaning="log-softmax at the token (NaN: not asked for)"),
    Tensor("TOP_LOGPROBS", "UINT8", (-1,), meaning="JSON [[token_id, text, logprob], ...] (empty: none)"),
)
# Triton's sequence batcher fills these from the request's flags and correlation id.
CONTROLS = (("START", "CONTROL_SEQUENCE_START"), ("END", "CONTROL_SEQUENCE_END"), ("CORRID", "CONTROL_SEQUENCE_CORRID"))
CORRID_DTYPE = "UINT64"
FLAG_START, FLAG_END = 1, 2   # a request's flags() in the Python backend

# scalar inputs -> TurnRequest field ("sampling." for a SamplingParams field) and its Python type
SCALARS = {"MAX_TOKENS": ("max_tokens", int), "TEMPERATURE": ("sampling.temperature", float),
           "TOP_K": ("sampling.top_k", int), "TOP_P": ("sampling.top_p", float), "SEED": ("sampling.seed", int),
           "RESUME": ("resume", bool)}
TURN_OPTIONS = ("stop", "logprobs", "raw", "free_slot", "after")   # OPTIONS keys besides SamplingParams fields
MAX_LOGPROBS = 20


def by_name(tensors) -> dict[str, Tensor]:
    return {t.name: t for t in tensors}


# ----------------------------------------------------------------------------------- errors
class ErrorKind(str, enum.Enum):
    """What went wrong, as carried on the wire (the values are the wire's codes)."""

    BAD_REQUEST = "invalid"                          # the request: do not resend it as is
    UNKNOWN_CONVERSATION = "unknown_conversation"    # no such conversation (ended, expired, never saved)
    BUSY = "overloaded"                              # every slot and the queue are full: retry later
    SHUTTING_DOWN = "shutting_down"                  # the server is stopping: retry on another / later
    INTERNAL = "internal"                            # a server bug, or a failed save
    SEQUENCE_RELEASED = "sequence_released"          # Triton released the idle sequence: resend with START + RESUME
    UNAVAILABLE = "unavailable"                      # the server cannot be reached / the connection broke
    TIMEOUT = "timeout"                              # no response in time
    ALREADY_DONE = "already_done"                    # the conversation moved past ``after``: the turn ran already
    CONVERSATION_BUSY = "conversation_busy"          # another worker holds the conversation's lease: retry


@dataclasses.dataclass(frozen=True)
class HttpError:
    status: int
    type: str                 # OpenAI's error type
    code: str | None
    retry_after: int | None   # seconds, sent as Retry-After


HTTP = {ErrorKind.BAD_REQUEST: HttpError(400, "invalid_request_error", None, None),
        ErrorKind.UNKNOWN_CONVERSATION: HttpError(404, "invalid_request_error", "conversation_not_found", None),
        ErrorKind.BUSY: HttpError(429, "server_error", "server_busy", 1),
        ErrorKind.SHUTTING_DOWN: HttpError(503, "server_error", "shutting_down", 5),
        ErrorKind.INTERNAL: HttpError(500, "server_error", "internal_error", None),
        ErrorKind.SEQUENCE_RELEASED: HttpError(503, "server_error", "server_unavailable", 1),
        ErrorKind.UNAVAILABLE: HttpError(503, "server_error", "server_unavailable", 5),
        ErrorKind.TIMEOUT: HttpError(504, "server_error", "timeout", None),
        ErrorKind.ALREADY_DONE: HttpError(409, "invalid_request_error", "turn_already_done", None),
        ErrorKind.CONVERSATION_BUSY: HttpError(409, "server_error", "conversation_busy", 1)}


class ServingError(UserError):
    """An error with its :class:`ErrorKind`; the message is for people, the kind for programs."""

    kind = ErrorKind.BAD_REQUEST

    def __init__(self, message: str, kind: ErrorKind | str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = ErrorKind(kind)


class Overloaded(ServingError):
    """Every slot is busy and the waiting queue is full: the client should retry later."""

    kind = ErrorKind.BUSY


def kind_of(error: BaseException) -> ErrorKind:
    """The kind of any exception a turn ends with: its own, BAD_REQUEST for other bad input, else INTERNAL."""
    if isinstance(error, ServingError):
        return error.kind
    return ErrorKind.BAD_REQUEST if isinstance(error, UserError) else ErrorKind.INTERNAL


_PAYLOAD = "streaming_trt_error"


def encode_error(error: BaseException) -> str:
    """The message of the Triton error a turn ends with: ``{"streaming_trt_error": KIND, "message": TEXT}``."""
    return json.dumps({_PAYLOAD: kind_of(error).value, "message": str(error)}, ensure_ascii=False)


# Triton's own refusals carry no code of ours: its wording is the only signal there is (Triton 2.51).
_TRITON_REFUSALS = (("must specify the START flag", ErrorKind.SEQUENCE_RELEASED),
                    ("Exceeds maximum queue size", ErrorKind.BUSY))


def decode_error(message: str) -> tuple[ErrorKind, str]:
    """An in-band error message -> (kind, text): our payload, or a refusal of Triton's own."""
    start = message.find("{")
    if start >= 0:
        try:
            payload = json.loads(message[start:])
        except (json.JSONDecodeError, RecursionError):
            payload = None
        if isinstance(payload, dict) and _PAYLOAD in payload:
            try:
                return ErrorKind(payload[_PAYLOAD]), str(payload.get("message", ""))
            except ValueError:  # a kind of a newer server
                return ErrorKind.INTERNAL, str(payload.get("message", ""))
    for words, kind in _TRITON_REFUSALS:
        if words in message:
            return kind, message
    return ErrorKind.BAD_REQUEST, message


# ----------------------------------------------------------------------------------- records
@dataclasses.dataclass
class TokenEvent:
    """One reply token."""

    token: int                       # the generated id (-1: a piece of text only, released at the end)
    text: str                        # text safe to show now (stop strings held back)
    logprob: float | None = None     # log-softmax of the model's logits at ``token``
    top: list | None = None          # [[token_id, text, logprob], ...], the most likely first


@dataclasses.dataclass
class TurnResult:
    """How a turn ended."""

    prompt_tokens: int          # tokens fed for this turn's messages (the reply's closing not counted)
    completion_tokens: int      # tokens generated (a stop token included)
    finish_reason: str          # "stop", "length", "cancelled" or "ended"
    seen: int                   # stream length after the turn
    text: str = ""              # reply text released at the end (held back while it might begin a stop string)
    reply_ids: tuple[int, ...] = ()  # what the reply fed to the stream: generated ids (a stop token included), then its closing


@dataclasses.dataclass
class TurnRequest:
    """One turn of conversation ``cid``, parsed and validated when it is made (a bad one raises
    :class:`ServingError` of kind BAD_REQUEST, naming what to change).

    ``messages``: a list of ``{"role", "content"}`` dicts, or its JSON (str or UTF-8 bytes), kept
    parsed; ``[]`` with ``end`` ends the conversation without a turn. With ``raw``: the JSON of a
    string, a text continued as it is (no chat template, nothing closes the reply). ``start`` begins conversation ``cid`` anew unless ``resume``
    (continue the one saved under that id); ``end`` deletes it after the turn, except with
    ``free_slot`` (OPTIONS ``"free_slot": true``, END and no messages): only Triton's sequence slot of
    ``cid`` is given back, the conversation is left as it is (the Triton model sends one after refusing a
    START, :mod:`.tritonserver_model`). ``after``: the stream length (``TurnResult.seen``) the client last
    saw; a continuation of a conversation that is no longer there is refused (ALREADY_DONE) instead
    of fed: a resent turn, or one raced by another client, is fed at most once. ``token_ids``: the ids
    the turn feeds, already chat-templated by a front door (Dynamo's frontend); ``messages`` is then
    ``[]`` and the reply is closed as a chat reply. ``sampling``: a
    :class:`SamplingParams` or a dict of its fields. ``on_token(TokenEvent)`` is called per reply
    token and ``on_done(result, error)`` once, from the scheduler's threads; ``cancelled()`` is
    polled between steps. Server limits (reply length, input size) are checked by :meth:`within`.
    """

    cid: int
    messages: object
    start: bool = False
    resume: bool = False
    end: bool = False
    max_tokens: int | None = None
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    raw: bool = False
    token_ids: tuple[int, ...] | None = None
    free_slot: bool = False
    after: int | None = None
    on_token: Callable[[TokenEvent], None] = lambda event: None
    on_done: Callable[[TurnResult | None, Exception | None], None] = lambda result, error: None
    cancelled: Callable[[], bool] = lambda: False

    def __post_init__(self):
        if isinstance(self.cid, bool) or not isinstance(self.cid, int) or not 0 < self.cid < 1 << 64:
            _bad(f"the conversation id must be an integer in [1, 2**64), got {self.cid!r}")
        for name in ("start", "resume", "end", "raw", "free_slot"):
            if not isinstance(getattr(self, name), bool):
                _bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        self.messages = _parse_messages(self.messages)
        if self.raw and not (isinstance(self.messages, str) and self.messages):
            _bad("a raw turn's MESSAGES must be a non-empty JSON string: the text to continue")
        if not self.raw and not isinstance(self.messages, list):
            _bad("MESSAGES must be a JSON list of {\"role\", \"content\"} messages")
        if self.token_ids is not None:
            if self.raw or self.messages:
                _bad("a turn given as token ids takes no messages and no raw")
            if not isinstance(self.token_ids, (list, tuple)) or not self.token_ids or not all(
                    type(t) is int and t >= 0 for t in self.token_ids):
                _bad("token_ids must be a non-empty list of integer token ids >= 0")
            self.token_ids = tuple(self.token_ids)
        if self.after is not None and (isinstance(self.after, bool) or not isinstance(self.after, int)
                                       or not 0 <= self.after < 1 << 63):
            _bad(f"after must be an integer >= 0 (the stream length the turn continues), got {self.after!r}")
        if self.free_slot and not (self.end and self.messages == []):
            _bad("free_slot goes with END and no messages: it only gives back the sequence slot")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 0):
            _bad(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if isinstance(self.sampling, dict):
            self.sampling = SamplingParams(**self.sampling)
        elif not isinstance(self.sampling, SamplingParams):
            _bad(f"sampling must be SamplingParams or a dict of its fields, got {type(self.sampling).__name__}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            _bad("stop must be a string or a list of strings")
        self.stop = tuple(stop_strings(self.stop))  # bounded as the matcher takes them (a UserError: BAD_REQUEST)
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            _bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (top alternatives per token) or null")

    def within(self, max_tokens_limit: int) -> None:
        """Refuse what exceeds the server's limits (checked by the scheduler on submit)."""
        if self.max_tokens is not None and self.max_tokens > max_tokens_limit:
            _bad(f"max_tokens must be in [0, {max_tokens_limit}], got {self.max_tokens}")


def conversation_id(value) -> int:
    """A sequence correlation id as Triton hands it over (an integer, or a string when the client sent
    one) -> the conversation id: an integer in [1, 2**64), a string only in canonical decimal
    ("0123" would alias 123; anything else is refused, never truncated)."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit() and not value.startswith("0") and len(value) <= 20):
            _bad(f"the conversation id must be a decimal integer in [1, 2**64) without leading zeros, got {value[:40]!r}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 64:
        _bad(f"the conversation id must be an integer in [1, 2**64), got {str(value)[:40]!r}")
    return value


def _bad(message: str):
    raise ServingError(message, ErrorKind.BAD_REQUEST)


def _parse_messages(raw):
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            _bad("MESSAGES is not valid UTF-8")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as e:
            _bad(f"MESSAGES is not valid JSON ({e})")
    return [raw] if isinstance(raw, dict) else raw


def parse_options(raw: bytes | str | dict) -> tuple[dict, dict]:
    """The OPTIONS input (a UTF-8 JSON object) -> (SamplingParams fields, turn fields ``stop``,
    ``logprobs``, ``raw``); an unknown key is refused by name."""
    if not isinstance(raw, dict):
        try:
            raw = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
        except (ValueError, RecursionError) as e:  # ValueError: also an integer of thousands of digits
            _bad(f"OPTIONS is not a valid UTF-8 JSON object ({e})")
    if not isinstance(raw, dict):
        _bad("OPTIONS must be a JSON object")
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    sampling, turn = {}, {}
    for key, value in raw.items():
        if key in fields:
            sampling[key] = value
        elif key in TURN_OPTIONS:
            turn[key] = value
        else:
            _bad(f"OPTIONS has an unknown option {key!r}; known: {sorted(fields | set(TURN_OPTIONS))}")
    return sampling, turn


def decode_request(read: Callable[[str], object], flags: int, cid: int, max_input_bytes: int, **callbacks) -> TurnRequest:
    """A Triton request -> :class:`TurnRequest`, the one parse of the wire's inputs.

    ``read(name)``: the input tensor as a flat numpy array, or None when absent. ``callbacks``:
    ``on_token``, ``on_done``, ``cancelled``.
    """
    messages = read("MESSAGES")
    if messages is None:
        _bad("the MESSAGES input is missing")
    if str(messages.dtype) != by_name(INPUTS)["MESSAGES"].numpy:
        _bad("MESSAGES must be UINT8: the UTF-8 bytes of a JSON list of messages")
    if messages.size > max_input_bytes:
        _bad(f"the messages are {messages.size} bytes, more than the server's limit of {max_input_bytes} bytes; "
             "send a shorter message")
    fields, sampling = {}, {"seed": 0}
    for name, (field, cast) in SCALARS.items():
        values = read(name)
        if values is None:
            continue
        if values.size != 1:
            _bad(f"{name} must hold exactly one value, got {values.size}")
        value = cast(values.reshape(-1)[0].item())
        if field.startswith("sampling."):
            sampling[field.removeprefix("sampling.")] = value
        else:
            fields[field] = value
    options = read("OPTIONS")
    if options is not None and options.size > MAX_OPTIONS_BYTES:
        _bad(f"OPTIONS is {options.size} bytes; at most {MAX_OPTIONS_BYTES}")
    if options is not None:
        more, turn = parse_options(options.tobytes())
        sampling.update(more)
        fields.update(turn)
    return TurnRequest(cid, messages.tobytes(), start=bool(flags & FLAG_START), end=bool(flags & FLAG_END),
                       sampling=sampling, **fields, **callbacks)


def request_inputs(messages, max_tokens: int | None = None, temperature: float | None = None,
                   top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                   resume: bool = False, options: dict | None = None) -> list[tuple[Tensor, object]]:
    """What a client sends for one turn: ``(tensor, numpy array)`` per input present."""
    spec = by_name(INPUTS)
    out = [(spec["MESSAGES"], np.frombuffer(json.dumps(messages).encode("utf-8"), dtype=np.uint8))]
    for name, value in (("MAX_TOKENS", max_tokens), ("TEMPERATURE", temperature), ("TOP_K", top_k),
                        ("TOP_P", top_p), ("SEED", seed), ("RESUME", True if resume else None)):
        if value is not None:
            out.append((spec[name], np.array([value], dtype=spec[name].numpy)))
    if options:  # the other SamplingParams fields, stop, logprobs, raw
        out.append((spec["OPTIONS"], np.frombuffer(json.dumps(options).encode("utf-8"), dtype=np.uint8)))
    return out


# ----------------------------------------------------------------------------------- responses
def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", "surrogatepass"))


def response_outputs(item: TokenEvent | TurnResult) -> dict[str, list]:
    """The output values of one response (every tensor of :data:`OUTPUTS`, as a flat list)."""
    if isinstance(item, TokenEvent):
        return {"TOKEN_ID": [item.token], "TEXT": _utf8(item.text), "PROMPT_TOKENS": [0], "COMPLETION_TOKENS": [0],
                "SEEN": [0], "FINISH": [], "LOGPROB": [math.nan if item.logprob is None else item.logprob],
                "TOP_LOGPROBS": _utf8("" if item.top is None else json.dumps(item.top))}
    return {"TOKEN_ID": [-1], "TEXT": _utf8(item.text), "PROMPT_TOKENS": [item.prompt_tokens],
            "COMPLETION_TOKENS": [item.completion_tokens], "SEEN": [item.seen], "FINISH": _utf8(item.finish_reason),
            "LOGPROB": [math.nan], "TOP_LOGPROBS": []}


def decode_response(read: Callable[[str], object]) -> TokenEvent | TurnResult:
    """A response -> its record; ``read(name)``: the output as a numpy array (None when absent)."""

    def scalar(name):
        return read(name).reshape(-1)[0].item()

    def text(name):
        values = read(name)
        return "" if values is None else values.tobytes().decode("utf-8")

    token = int(scalar("TOKEN_ID"))
    if token >= 0:
        value = read("LOGPROB")
        logprob = None if value is None or math.isnan(float(value.reshape(-1)[0])) else float(value.reshape(-1)[0])
        top = text("TOP_LOGPROBS")
        return TokenEvent(token, text("TEXT"), logprob, json.loads(top) if top else None)
    return TurnResult(int(scalar("PROMPT_TOKENS")), int(scalar("COMPLETION_TOKENS")), text("FINISH"),
                      int(scalar("SEEN")), text("TEXT"))
