"""Stop strings over crafted token sequences: a stop spanning 2, 3 and 4 tokens, streamed piece by
piece and pushed whole; held back while it may still match, never emitted; generate_text ends at
the token that completes it."""
from __future__ import annotations

import pytest
import torch

from streaming_trt.contract import UserError
from streaming_trt.runtime.generation import StopStrings, generate_text

# token id -> text piece; the stop "STOP" / "<|end|>" split over several of them
VOCAB = ["Hel", "lo", " wor", "ld", "!", " S", "T", "OP", "ST", "<", "|e", "nd", "|>", " more", "S", "O", "P",
         "x", "<|", "end|>", "\n"]


def streamed(stops, pieces):
    """Push ``pieces`` one by one: (what was emitted after each push, hit, total emitted)."""
    s = StopStrings(stops)
    emitted, hit = [], False
    for piece in pieces:
        text, hit = s.push(piece)
        emitted.append(text)
        if hit:
            break
    tail = "" if hit else s.flush()
    return emitted, hit, "".join(emitted) + tail


def whole(stops, pieces):
    s = StopStrings(stops)
    text, hit = s.push("".join(pieces))
    return text + ("" if hit else s.flush()), hit


CASES = [  # (stops, token pieces, expected text, hit)
    # two tokens: "ST" + "OP"
    (["STOP"], ["Hel", "lo", " ", "ST", "OP", " more"], "Hello ", True),
    # three tokens: " S" + "T" + "OP"
    (["STOP"], ["Hel", "lo", " S", "T", "OP", "x"], "Hello ", True),
    # four tokens: "<" "|e" "nd" "|>"
    (["<|end|>"], [" wor", "ld", "<", "|e", "nd", "|>", " more"], " world", True),
    # four tokens, the stop in the middle of the first and last pieces
    (["S", "STOP"][1:], ["xS", "T", "O", "Px"], "x", True),
    # several stops: the earliest in the text wins
    (["!", "ld"], ["Hel", "lo", " wor", "ld", "!"], "Hello wor", True),
    # a false start is released once it cannot match: "ST" then "x"
    (["STOP"], ["Hel", "ST", "x", "S", "T", "O"], "HelSTxSTO", False),
    # no stop strings: everything passes through
    ([], ["Hel", "lo"], "Hello", False),
]


@pytest.mark.parametrize("stops,pieces,expected,hit", CASES)
def test_stream_and_whole_text_agree(stops, pieces, expected, hit):
    emitted, got_hit, text = streamed(stops, pieces)
    assert (text, got_hit) == (expected, hit)
    assert whole(stops, pieces) == (expected, hit)
    for s in stops:  # never a stop string, never a part of one past the cut
        assert s not in text


@pytest.mark.parametrize("split", [2, 3, 4])
def test_held_back_exactly_while_the_stop_may_still_match(split):
    """``<|end|>`` arriving in ``split`` pieces: nothing of it is emitted as it arrives; the text
    before it is emitted as soon as it cannot start the stop string."""
    parts = {2: ["<|", "end|>"], 3: ["<", "|e", "nd|>"], 4: ["<", "|e", "nd", "|>"]}[split]
    s = StopStrings(["<|end|>"])
    assert s.push("Hello") == ("Hello", False)
    for part in parts[:-1]:
        assert s.push(part) == ("", False)
    assert s.push(parts[-1]) == ("", True)
    assert s.push("more") == ("", True)  # after a hit nothing more comes out
    # the same start, then something else: the held text comes out in one piece
    s = StopStrings(["<|end|>"])
    s.push("Hi")
    held = "".join(p for p in parts[:-1])
    for part in parts[:-1]:
        s.push(part)
    assert s.push(" x") == (held + " x", False)
    # ending without a hit: flush gives back what was held
    s = StopStrings(["<|end|>"])
    s.push("Hi")
    for part in parts[:-1]:
        s.push(part)
    assert s.flush() == held and s.flush() == ""


def test_a_piece_that_holds_a_stop_and_more():
    s = StopStrings(["ab", "zzz"])
    assert s.push("xyz") == ("xy", False)  # "z" may start "zzz"
    assert s.push("zab") == ("zz", True)  # "zzab": "zzz" can no longer complete; cut at "ab"
    s = StopStrings(["ab", "zzz"])
    s.push("xyz")
    assert s.push("zzq") == ("", True)  # "zzzq": "zzz" starts at 0 of the held text


@pytest.mark.parametrize("bad,message", [([1], "must be text"), (5, "list of text")])
def test_bad_stop_strings(bad, message):
    with pytest.raises(UserError, match=message):
        StopStrings(bad)


# --- generate_text on a scripted model ------------------------------------------------------------------


class Tok:
    """A tokenizer over VOCAB: decode joins pieces; encode gives one token (the prompt is not the test)."""

    eos_token_id = None

    def decode(self, ids):
        return "".join(VOCAB[i] for i in ids)

    def encode(self, text, add_special_tokens=True):
        return [VOCAB.index("x")]


class Scripted:
    """A batch-1 session whose logits make greedy decoding produce ``script`` token by token."""

    batch, device = 1, "cpu"

    def __init__(self, script):
        self.script, self.fed = list(script), []
        self.model = type("M", (), {"config": type("C", (), {"eos_token_id": None})(), "device": "cpu"})()
        self.last_logits = None

    def feed(self, ids, all_logits=False):
        self.fed.extend(ids)
        step = len(self.fed) - 1  # tokens generated so far (the one-token prompt excluded)
        logits = torch.zeros(1, len(VOCAB))
        if step < len(self.script):
            logits[0, self.script[step]] = 10.0
        self.last_logits = logits
        return logits


@pytest.mark.parametrize("pieces,stop,expected", [
    (["Hel", "lo", "ST", "OP", " more", "!"], "STOP", "Hello"),
    (["Hel", "lo", " S", "T", "OP", " more"], "STOP", "Hello "),
    (["Hel", "lo", "<", "|e", "nd", "|>", " more"], "<|end|>", "Hello"),
])
def test_generate_text_ends_at_the_token_completing_the_stop(pieces, stop, expected):
    ids = [VOCAB.index(p) for p in pieces]
    session = Scripted(ids)
    streamed_pieces = list(generate_text(session, Tok(), "x", 20, stop_token_ids=[], stop_strings=[stop]))
    assert "".join(streamed_pieces) == expected
    completing = next(i for i in range(len(pieces)) if stop in "".join(pieces[: i + 1]))
    assert session.fed[1:] == ids[: completing + 1]  # generation stopped there
    # without the stop string: the whole script
    full = "".join(generate_text(Scripted(ids), Tok(), "x", len(ids), stop_token_ids=[]))
    assert full == "".join(pieces)


def test_chat_stops_before_a_stop_string_and_gives_back_held_text(tmp_path):
    """Chat.reply (the chat CLI's turn) with stop strings, greedy: the reply ends before
    the stop string, and text held back for a stop string that never came is given back."""
    import streaming_trt as st
    from checkpoints import make_checkpoint, save_tokenizer
    from streaming_trt.runtime.chat import Chat
    from streaming_trt.runtime.generation import eos_ids
    from streaming_trt.runtime.sampling import Sampler, SamplingParams

    make_checkpoint(tmp_path, "llama", seed=3)
    save_tokenizer(tmp_path)
    model, tok = st.load_model(tmp_path), st.load_tokenizer(tmp_path)

    def reply(stops):
        conv = Chat(tok, eos_ids(tok, model.config))
        pieces = list(conv.reply(model.session(4, 40), "hello there", 20, Sampler(SamplingParams(temperature=0.0)),
                                 stop_strings=stops))
        return "".join(p for _, p in pieces), conv.finish_reason

    full, _ = reply(())
    assert len(full) >= 6, full
    cut = full[3:5]
    text, reason = reply((cut,))
    assert text == full[: full.index(cut)] and reason == "stop"
    never = full[-2:] + "\x7f\x7f"  # begins at the reply's end, never completes
    assert reply((never,)) == reply(())


# --- the automaton against the plain definition -------------------------------------------------------


def reference_push(strings, held, piece):
    """The definition, by brute force: cut at the earliest stop in the text, else hold back its
    longest tail that begins a stop string."""
    text = held + piece
    starts = [i for i in (text.find(s) for s in strings) if i >= 0]
    if starts:
        return text[: min(starts)], "", True
    keep = max((k for s in strings for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)
    return text[: len(text) - keep], text[len(text) - keep:], False


@pytest.mark.parametrize("seed", range(40))
def test_automaton_equals_the_definition(seed):
    import random

    rng = random.Random(seed)
    alphabet = "abc" if seed % 2 else "ab\n"
    stops = [("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))) for _ in range(rng.randint(1, 5))]
    s, held = StopStrings(stops), ""
    strings = [x for x in dict.fromkeys(stops) if x]
    for _ in range(60):
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        want_text, held, want_hit = reference_push(strings, held, piece)
        assert s.push(piece) == (want_text, want_hit), (stops, piece)
        if want_hit:
            break
        assert s.held == held


def test_stop_strings_are_bounded():
    from streaming_trt.runtime.generation import MAX_STOP_CHARS, MAX_STOP_STRINGS

    with pytest.raises(UserError, match=f"at most {MAX_STOP_STRINGS}"):
        StopStrings([f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(UserError, match=f"at most {MAX_STOP_CHARS}"):
        StopStrings(["x" * (MAX_STOP_CHARS + 1)])
    # the held text never outgrows the longest stop string, however long the near-miss
    s, emitted = StopStrings(["a" * 50 + "b", "a" * 40 + "c"]), ""
    for _ in range(1000):
        emitted += s.push("a")[0]
        assert len(s.held) <= 50
    text, hit = s.push("c")
    assert hit and emitted + text == "a" * 960
