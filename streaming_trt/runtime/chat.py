"""A chat conversation on one endless stream: what each turn feeds, the reply, what closes it.

The chat CLI, the server's scheduler, ``bench.serve`` and the tests all go through
:class:`Chat`, so a conversation served in a batch feeds exactly the tokens the same
conversation fed in-process does.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

from ..contract import UserError
from .generation import StopStrings, generate_tokens
from .generation import IncrementalDecoder

_USER, _ASSISTANT = "\x01user-placeholder\x01", "\x01assistant-placeholder\x01"
_CONTENT = re.compile("\x02content-([0-9]+)\x02")  # a message's text that must stay text
ROLES = ("system", "user", "assistant")


def control_texts(tokenizer) -> tuple[str, ...]:
    """The strings this tokenizer reads as control tokens wherever they appear in text."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "get_added_vocab", None)
    if added is not None:
        texts.update(added())
    return tuple(t for t in texts if t)


class TurnEncoder:
    """Token ids for one new user turn, taken from the tokenizer's own chat template.

    The template is rendered over a fixed two-message conversation with and without the new turn;
    the difference is what the new turn adds to the stream. The cost does not grow with the
    conversation.
    """

    def __init__(self, tokenizer, system: str | None = None):
        self.tokenizer = tokenizer
        self.controls = control_texts(tokenizer)
        self.texts: list[str] = []  # message texts standing in the rendered template as _CONTENT marks
        self.system = [{"role": "system", "content": system}] if system else []
        base = self.system + [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}]
        self._base = base
        # What the template puts after an assistant reply (end-of-turn marker, newline, ...).
        self.end_of_reply = self._render(base, False).split(_ASSISTANT, 1)[1]

    def _render(self, messages, add_generation_prompt: bool) -> str:
        """The template over ``messages``; a user or system message whose text holds control-token
        text (``<|im_end|>`` typed by a user) is rendered as a mark that :meth:`_encode` encodes as
        plain text, so only the template's own control tokens are control tokens."""
        self.texts = []
        marked = []
        for m in messages:  # what users and system prompts say; a reply stays as the model said it
            if m["role"] != "assistant" and any(c in m["content"] for c in self.controls):
                self.texts.append(m["content"])
                m = dict(m, content=f"\x02content-{len(self.texts) - 1}\x02")
            marked.append(m)
        try:
            return self.tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except Exception as e:  # a tokenizer without a template, or a template that rejects roles
            raise UserError(f"the tokenizer's chat template cannot be used ({type(e).__name__}: {e})") from None

    def first_turn(self, messages: str | list[dict]) -> list[int]:
        """The whole opening of a conversation: the system prompt (if any), then ``messages``
        (a list of messages, or one user message's text)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self._encode(self._render(self.system + messages, True))

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
        ids, parts = [], _CONTENT.split(text)
        for i, part in enumerate(parts):  # template text, message index, template text, ...
            if i % 2:
                ids += self.tokenizer.encode(self.texts[int(part)], add_special_tokens=False, split_special_tokens=True)
            elif part:
                ids += self.tokenizer.encode(part, add_special_tokens=False)
        return ids


def check_messages(messages) -> list[dict]:
    """``messages``: a user's text, or a list of ``{"role", "content"}`` dicts whose last one is
    the user's; returns the list, validated (``UserError`` saying what is wrong otherwise)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"message {i} must be an object with \"role\" in {list(ROLES)} and a string \"content\"")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise UserError("the last message must have role \"user\"")
    if not out[-1]["content"].strip():
        raise UserError("the user message is empty")
    return out


class Chat:
    """One conversation: the ids each turn feeds, and those that close each reply.

    The first turn feeds the whole message list through the tokenizer's chat template (the
    history in chunks, however long); every later turn feeds only its one new user message, then
    the reply as generated, then what closes the reply, so the stream never re-encodes its history.

    Args:
        tokenizer: the model's tokenizer.
        stop_ids: ids that end a reply (:func:`streaming_trt.runtime.generation.eos_ids`).
        system: a system prompt placed before the first turn.
        started: the stream already holds earlier turns (a continued or restored conversation).
        encoder: a :class:`TurnEncoder` to share between conversations of one tokenizer.
    """

    def __init__(self, tokenizer, stop_ids: set[int], system: str | None = None, started: bool = False,
                 encoder: TurnEncoder | None = None):
        self.tokenizer, self.stop_ids, self.started = tokenizer, set(stop_ids), started
        self.encoder = encoder or TurnEncoder(tokenizer, system)
        self.finish_reason: str | None = None

    def turn_ids(self, messages) -> list[int]:
        """The ids a turn feeds; ``messages`` as for :func:`check_messages`. A continued
        conversation takes exactly one new user message."""
        messages = check_messages(messages)
        if not self.started:
            ids = self.encoder.first_turn(messages)
        elif len(messages) != 1:
            raise UserError("a turn of an ongoing conversation takes exactly one new user message")
        else:
            ids = self.encoder.next_turn(messages[0]["content"])
        self.started = True
        return ids

    def closing_ids(self, last_token: int | None) -> list[int]:
        """What closes a reply whose last generated token was ``last_token`` (None: no reply)."""
        return self.encoder.after_reply(last_token if last_token in self.stop_ids else None)

    def reply(self, session, messages, max_tokens: int, sampler, cancelled: Callable[[], bool] = lambda: False,
              stop_strings: tuple[str, ...] = ()) -> Iterator[tuple[int, str]]:
        """Run one turn in-process on stream 0 of a batch-1 ``session``: yields ``(token, text)``
        per reply token (the stop token is fed but not yielded), then feeds the closing ids.
        ``stop_strings`` end the reply before them (:class:`~streaming_trt.runtime.generation.StopStrings`:
        text that may begin one is held back, and yielded at the end with token -1 if none came).
        ``self.finish_reason`` is then "stop", "length" or "cancelled"."""
        ids = self.turn_ids(messages)
        decoder = IncrementalDecoder(self.tokenizer)
        stops = StopStrings(list(stop_strings)) if stop_strings else None
        last, hit, self.finish_reason = None, False, "length"
        for token in generate_tokens(session, ids, max_tokens, sampler=sampler, stop_token_ids=self.stop_ids):
            last = token
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            text = decoder.push(token)
            if stops is not None:
                text, hit = stops.push(text)
            yield token, text
            if hit:
                self.finish_reason = "stop"
                break
            if cancelled():
                self.finish_reason = "cancelled"
                break
        if stops is not None and not hit and (held := stops.flush()):
            yield -1, held
        closing = self.closing_ids(last)
        if closing:
            session.feed(closing, all_logits=False)
