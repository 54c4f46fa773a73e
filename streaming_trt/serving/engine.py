"""One conversation turn on a stored streaming session; what the Triton model runs per request.

Kept free of Triton so that it runs (and is tested) in-process too.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

from ..errors import UserError

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class TurnResult:
    prompt_tokens: int          # tokens fed for this turn's messages (the reply's closing not counted)
    completion_tokens: int      # tokens generated (a stop token included)
    finish_reason: str          # "stop", "length" or "cancelled"
    seen: int                   # stream length after the turn


def parse_messages(raw) -> list[dict]:
    """``raw``: a JSON string (or bytes, or an already parsed list) of ``{"role", "content"}``
    messages; returns them validated. The last message must be the user's."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError("MESSAGES is not valid UTF-8") from None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"MESSAGES is not valid JSON ({e})") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise UserError("MESSAGES must be a non-empty JSON list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"message {i} must be an object with \"role\" in {list(ROLES)} and a string \"content\"")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise UserError("the last message must have role \"user\"")
    if not out[-1]["content"].strip():
        raise UserError("the user message is empty")
    return out


def _is_empty_list(raw) -> bool:
    if isinstance(raw, (bytes, bytearray, str)):
        return raw.strip() in ("[]", b"[]")
    return raw == []


class Engine:
    """Runs turns of many conversations on one model (one at a time).

    A turn that starts a conversation feeds its whole message list through the tokenizer's chat
    template (the history in chunks, however long); a turn that continues one feeds only the new
    user message (``TurnEncoder.next_turn``), then the reply, then what closes the reply: the same
    tokens ``python -m streaming_trt.chat`` feeds, so the stream never re-encodes its history.
    """

    def __init__(self, model, tokenizer, store, max_new_tokens: int = 256, max_new_tokens_limit: int = 4096,
                 max_input_bytes: int = 256 * 1024):
        from ..chat import TurnEncoder
        from ..generation import eos_ids

        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.turns = TurnEncoder(tokenizer)
        self.stop = eos_ids(tokenizer, model.config)
        self.max_new_tokens, self.max_new_tokens_limit = max_new_tokens, max_new_tokens_limit
        self.max_input_bytes = max_input_bytes

    def prompt_ids(self, messages: list[dict], start: bool) -> list[int]:
        if start:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # a template that rejects these roles
                raise UserError(f"the chat template cannot render these messages ({type(e).__name__}: {e})") from None
            return self.tokenizer.encode(text, add_special_tokens=False)
        if len(messages) != 1:
            raise UserError("a turn of an ongoing conversation takes exactly one new user message")
        return self.turns.next_turn(messages[0]["content"])

    def turn(self, cid: int, messages, *, start: bool = False, resume: bool = False, end: bool = False,
             max_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, emit: Callable[[int, str], None] = lambda token, piece: None,
             cancelled: Callable[[], bool] = lambda: False) -> TurnResult:
        """Answer one turn of conversation ``cid``; ``emit(token_id, text_piece)`` per reply token.

        ``messages`` may be ``[]`` with ``end``: the conversation ends without a turn.
        ``start`` begins conversation ``cid`` anew unless ``resume`` (continue the one saved under
        that id, e.g. after a server restart made Triton forget the sequence). ``end`` deletes the
        conversation after the turn. Bad input raises UserError before any state changes; a
        failure during generation leaves the conversation as saved after its previous turn.
        """
        from ..generation import generate_tokens
        from ..sampling import Sampler, SamplingParams
        from ..tokenizer import IncrementalDecoder

        if isinstance(messages, (bytes, bytearray, str)) and len(messages) > self.max_input_bytes:
            raise UserError(f"the messages are {len(messages)} bytes, more than the server's limit of "
                            f"{self.max_input_bytes} bytes; send a shorter message")
        if end and _is_empty_list(messages):  # END alone: no turn
            if not self.store.exists(cid):
                raise UserError(f"conversation {cid} is unknown or has ended")
            self.store.end(cid)
            return TurnResult(0, 0, "ended", 0)
        messages = parse_messages(messages)
        max_tokens = self.max_new_tokens if max_tokens is None else int(max_tokens)
        if not 0 <= max_tokens <= self.max_new_tokens_limit:
            raise UserError(f"max_tokens must be in [0, {self.max_new_tokens_limit}], got {max_tokens}")
        sampler = Sampler(SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                         seed=int(seed)), self.model.device)
        fresh = start and not resume
        ids = self.prompt_ids(messages, fresh)
        session = self.store.start(cid) if fresh else self.store.get(cid)
        decoder = IncrementalDecoder(self.tokenizer)
        last, count, reason = None, 0, "length"
        try:
            for token in generate_tokens(session, ids, max_tokens, sampler=sampler, stop_token_ids=self.stop):
                last, count = token, count + 1
                if token in self.stop:
                    reason = "stop"
                    break
                emit(token, decoder.push(token))
                if cancelled():
                    reason = "cancelled"
                    break
            closing = self.turns.after_reply(last if last in self.stop else None)
            if closing:
                session.feed(closing, all_logits=False)
            self.store.save(cid)
        except BaseException:
            self.store.forget(cid)  # the file still holds the previous turn
            raise
        seen = session.seen[0]
        if end:
            self.store.end(cid)
        return TurnResult(len(ids), count, reason, seen)
