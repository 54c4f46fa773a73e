"""What one conversation turn is, as the scheduler takes it and reports it (kept free of Triton)."""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

from ..contract import UserError
from ..sampling import SamplingParams


class Overloaded(UserError):
    """Every slot is busy and the waiting queue is full: the client should retry later."""


@dataclasses.dataclass
class TokenEvent:
    token: int                       # the generated id
    text: str                        # text safe to show now (stop strings held back)
    logprob: float | None = None     # log-softmax of the model's logits at ``token``
    top: list | None = None          # [[token_id, text, logprob], ...], the most likely first


@dataclasses.dataclass
class TurnResult:
    prompt_tokens: int          # tokens fed for this turn's messages (the reply's closing not counted)
    completion_tokens: int      # tokens generated (a stop token included)
    finish_reason: str          # "stop", "length", "cancelled" or "ended"
    seen: int                   # stream length after the turn
    text: str = ""              # reply text released at the end (held back while it might begin a stop string)


@dataclasses.dataclass
class TurnRequest:
    """One turn of conversation ``cid``, as a server receives it.

    ``messages``: a list of ``{"role", "content"}`` dicts, or its JSON (str or UTF-8 bytes); ``[]``
    with ``end`` ends the conversation without a turn. ``start`` begins conversation ``cid`` anew
    unless ``resume`` (continue the one saved under that id). ``end`` deletes it after the turn.
    ``raw``: ``messages`` is a text continued as it is (no chat template, nothing closes the reply).
    ``on_token(TokenEvent)`` is called per reply token and ``on_done(result, error)`` once, from the
    scheduler's threads; ``cancelled()`` is polled between steps.
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
    on_token: Callable[[TokenEvent], None] = lambda event: None
    on_done: Callable[[TurnResult | None, Exception | None], None] = lambda result, error: None
    cancelled: Callable[[], bool] = lambda: False


def parse_messages(raw, max_bytes: int) -> list[dict] | list:
    """``raw`` as :class:`TurnRequest` takes it -> a list (validated later by the Conversation)."""
    if isinstance(raw, (bytes, bytearray, str)):
        if len(raw) > max_bytes:
            raise UserError(f"the messages are {len(raw)} bytes, more than the server's limit of {max_bytes} "
                            "bytes; send a shorter message")
        if isinstance(raw, (bytes, bytearray)):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError("MESSAGES is not valid UTF-8") from None
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as e:
            raise UserError(f"MESSAGES is not valid JSON ({e})") from None
    return [raw] if isinstance(raw, dict) else raw
