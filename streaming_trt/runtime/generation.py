"""Text generation over a streaming session: token ids or decoded text, streamed as drawn."""
from __future__ import annotations

import collections
import numbers
from typing import Iterable, Iterator

from ..contract import UserError
from .sampling import Sampler, SamplingParams


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces without re-decoding the whole output.

    Keeps only a few recent ids, so memory stays constant however long the stream; text is
    held back while it ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer, context: int = 4):
        self.tokenizer, self.context = tokenizer, context
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(self.ids) already returned

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted :]
        if len(self.ids) > self.context:
            keep = self.ids[-self.context :]
            self.ids, self.emitted = keep, len(self.tokenizer.decode(keep))
        else:
            self.emitted = len(text)
        return piece


def eos_ids(tokenizer, config) -> set[int]:
    """Token ids that end a reply: the tokenizer's and the model config's end-of-sequence ids."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "end_of_turn_id", None),
                  config.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


MAX_STOP_STRINGS = 16     # stop strings one request may give
MAX_STOP_CHARS = 1024     # characters in one stop string


def stop_strings(strings: Iterable[str]) -> list[str]:
    """The stop strings as :class:`StopStrings` takes them: text only, at most
    :data:`MAX_STOP_STRINGS` non-empty ones of at most :data:`MAX_STOP_CHARS` characters (``UserError``
    saying which bound otherwise), then empty ones and repeats dropped."""
    if isinstance(strings, str):
        strings = [strings]
    try:
        values = list(strings)
    except TypeError:
        raise UserError(f"stop strings must be a list of text, got {type(strings).__name__}") from None
    bad = [s for s in values if not isinstance(s, str)]
    if bad:
        raise UserError(f"stop strings must be text, got {bad[0]!r}")
    values = [s for s in values if s]
    if len(values) > MAX_STOP_STRINGS:  # counted as given, repeats included
        raise UserError(f"{len(values)} stop strings given; at most {MAX_STOP_STRINGS}")
    long = [s for s in values if len(s) > MAX_STOP_CHARS]
    if long:
        raise UserError(f"a stop string has {len(long[0])} characters; at most {MAX_STOP_CHARS}")
    return list(dict.fromkeys(values))


class StopStrings:
    """Stop strings matched over streamed text, across token boundaries.

    ``push(piece)`` returns the text safe to emit now and whether a stop string was hit: text that
    might begin a stop string is held back until it cannot, and neither the stop string nor
    anything after it is ever emitted. The reply ends at the first piece after which the text holds
    a stop string, cut where the earliest one begins. ``flush()`` returns what is still held when
    generation ends without a hit. Empty strings are ignored; at most :data:`MAX_STOP_STRINGS` of at
    most :data:`MAX_STOP_CHARS` characters each.

    The strings are one Aho-Corasick automaton: each character costs amortised constant time however
    much text is held back, and the held text is the automaton's state (the longest tail of the text
    that begins some stop string).
    """

    def __init__(self, strings: Iterable[str] = ()):
        self.strings = stop_strings(strings)
        self._build()
        self.state = 0
        self.held = ""
        self.hit = False

    def _build(self) -> None:
        """States are the prefixes of the strings (0: the empty one); ``depth`` their length, ``fail``
        the longest proper suffix that is also a prefix, ``match`` the longest string ending there."""
        self.goto: list[dict[str, int]] = [{}]
        self.depth, self.fail, self.match = [0], [0], [0]
        for text in self.strings:
            state = 0
            for ch in text:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = self.goto[state][ch] = len(self.goto)
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.fail.append(0)
                    self.match.append(0)
                state = nxt
            self.match[state] = len(text)
        queue = collections.deque(self.goto[0].values())
        while queue:  # breadth first: a state's fail link is shallower, so it is final when used
            state = queue.popleft()
            self.match[state] = max(self.match[state], self.match[self.fail[state]])
            for ch, nxt in self.goto[state].items():
                f = self.fail[state]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[nxt] = self.goto[f][ch] if state and ch in self.goto[f] else 0
                queue.append(nxt)

    def _step(self, state: int, ch: str) -> int:
        while state and ch not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(ch, 0)

    def push(self, piece: str) -> tuple[str, bool]:
        if self.hit:
            return "", True
        held = self.held + piece
        if not self.strings:
            self.held = ""
            return held, False
        state, cut, offset = self.state, None, len(self.held)
        for i, ch in enumerate(piece):
            state = self._step(state, ch)
            if self.match[state]:  # the longest string ending here begins earliest
                start = offset + i + 1 - self.match[state]
                cut = start if cut is None else min(cut, start)
        if cut is not None:
            self.held, self.hit = "", True
            return held[:cut], True
        self.state = state
        keep = self.depth[state]
        self.held = held[len(held) - keep:]
        return held[: len(held) - keep], False

    def flush(self) -> str:
        held, self.held, self.state = self.held, "", 0
        return held


def _token_set(ids: Iterable[int], name: str) -> set[int]:
    if isinstance(ids, (str, bytes)):
        raise UserError(f"{name} must be token ids (integers), got text {ids!r}")
    try:
        values = list(ids)
    except TypeError:
        raise UserError(f"{name} must be a collection of token ids, got {type(ids).__name__}") from None
    bad = [v for v in values if not isinstance(v, numbers.Integral) or isinstance(v, bool)]
    if bad:
        raise UserError(f"{name} must be integers, got {bad[0]!r}")
    return {int(v) for v in values}


def generate_tokens(
    session,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop_token_ids: Iterable[int] = (),
    sampler: Sampler | None = None,
) -> Iterator[int]:
    """Feed ``prompt_ids`` to stream 0 of a batch-1 session, then yield up to ``max_new_tokens`` ids.

    A stop token is yielded (and fed into the stream) before generation ends. An empty prompt
    continues from the session's newest logits. The prompt is shown to the sampler
    (:meth:`Sampler.observe`) so that penalties count it.
    """
    if session.batch != 1:
        raise UserError("generate_tokens works on a batch-1 session; use Session.feed for batches")
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(prompt_ids, (str, bytes)):
        raise UserError("prompt_ids must be token ids, got text; encode it with the tokenizer or use generate_text")
    stop = _token_set(stop_token_ids, "stop_token_ids")
    sampler = sampler or Sampler(sampling or SamplingParams(), session.device)
    if prompt_ids:
        session.feed(list(prompt_ids), all_logits=False)
        sampler.observe(list(prompt_ids))
    elif session.last_logits is None:
        raise UserError("the prompt is empty and the session has no earlier tokens to continue from")
    for _ in range(max_new_tokens):
        token = int(sampler(session.last_logits)[0])
        session.feed([token], all_logits=False)
        yield token
        if token in stop:
            return


def generate_text(
    session,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    stop_token_ids: Iterable[int] | None = None,
    stop_strings: Iterable[str] = (),
    add_special_tokens: bool = True,
) -> Iterator[str]:
    """Stream text: encode ``prompt``, feed it, and yield decoded pieces as tokens are drawn.

    Args:
        session: a batch-1 :class:`~streaming_trt.runtime.session.Session`.
        tokenizer: the model's tokenizer (``load_tokenizer``).
        prompt: text; empty is an error for a fresh session.
        stop_token_ids: ends generation (default: the tokenizer's and config's eos ids).
        stop_strings: generation ends once the text produced contains one of these.
    """
    if prompt is not None and not isinstance(prompt, str):
        raise UserError(f"prompt must be text (str), got {type(prompt).__name__}; for token ids use generate_tokens")
    if not prompt and session.last_logits is None:
        raise UserError("the prompt is empty: give some text to start from")
    ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens) if prompt else []
    stop_ids = (eos_ids(tokenizer, session.config) if stop_token_ids is None
                else _token_set(stop_token_ids, "stop_token_ids"))
    decoder = IncrementalDecoder(tokenizer)
    stops = StopStrings(stop_strings)
    for token in generate_tokens(session, ids, max_new_tokens, sampling, stop_ids):
        if token in stop_ids:
            break
        text, hit = stops.push(decoder.push(token))
        if text:
            yield text
        if hit:
            return
    rest = stops.flush()
    if rest:
        yield rest
