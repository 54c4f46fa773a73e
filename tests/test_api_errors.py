"""The Python API refuses bad arguments with UserError (a message saying what to change), leaves the
session as it was, and warns exactly at the boundary of the trained positions."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import streaming_trt as st
from checkpoints import make_checkpoint

MAX_POS = 256  # max_position_embeddings of the tiny checkpoint


@pytest.fixture(scope="module")
def model():
    return st.builtin_model()


@pytest.fixture(scope="module")
def tokenizer():
    return st.load_tokenizer(None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path, "llama", max_position_embeddings=MAX_POS)
    return st.load_model(path)


SESSION_ARGS = [  # (kwargs of model.session, message)
    (dict(sink_tokens=2, window=True), "window must be an integer"),
    (dict(sink_tokens=2, window=False), "window must be an integer"),
    (dict(sink_tokens=True, window=8), "sink_tokens must be an integer"),
    (dict(sink_tokens=2, window=8.0), "window must be an integer"),
    (dict(sink_tokens=2.0, window=8), "sink_tokens must be an integer"),
    (dict(sink_tokens=2, window="8"), "window must be an integer"),
    (dict(sink_tokens=2, window=None), "window must be an integer"),
    (dict(sink_tokens=2, window=0), "window must be an integer >= 1"),
    (dict(sink_tokens=-1, window=8), "sink_tokens must be an integer >= 0"),
    (dict(sink_tokens=2, window=8, batch=True), "batch must be"),
    (dict(sink_tokens=2, window=8, batch=2.0), "batch must be"),
    (dict(sink_tokens=2, window=8, batch=0), "batch must be"),
    (dict(sink_tokens=2, window=8, max_chunk=0), "max_chunk must be"),
    (dict(sink_tokens=2, window=1_000_000_000), "needs"),  # refused before allocation, not a RuntimeError
    (dict(sink_tokens=1_000_000_000, window=8), "needs"),
]


@pytest.mark.filterwarnings("ignore:capacity sink_tokens")  # the huge ones also pass the trained positions
@pytest.mark.parametrize("kwargs,message", SESSION_ARGS, ids=[str(k) for k, _ in SESSION_ARGS])
def test_bad_session_arguments(model, kwargs, message):
    with pytest.raises(st.UserError, match=message):
        model.session(**kwargs)


FEEDS = [  # (tokens, extra kwargs, message)
    ("hello", {}, "encode text with the tokenizer"),
    (None, {}, "tokens must be"),
    (5, {}, "tokens must be"),
    (b"ab", {}, "tokens must be"),
    ([1.5, 2.0], {}, "must be integers, got 1.5"),
    ([2.0], {}, "must be integers, got 2.0"),  # not silently truncated to 2
    ([1, True], {}, "must be integers"),
    (["a"], {}, "must be integers"),
    ([1, None], {}, "must be integers"),
    (torch.tensor([[1.0, 2.0]]), {}, "must be integers"),
    (torch.tensor([[True, False]]), {}, "must be integers"),
    (torch.zeros(1, 2, 3, dtype=torch.long), {}, "shape"),
    ([1, 2, 10_000], {}, "outside the vocabulary"),
    ([-1], {}, "outside the vocabulary"),
    (torch.tensor([[1, 2]]), dict(lengths=[1.5]), "lengths must be"),
    (torch.tensor([[1, 2]]), dict(lengths=[3]), "lengths must be"),
    (torch.tensor([[1, 2]]), dict(lengths=[-1]), "lengths must be"),
]


@pytest.mark.parametrize("tokens,kwargs,message", FEEDS, ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(FEEDS)])
def test_bad_feeds_are_refused_and_change_nothing(model, tokens, kwargs, message):
    session = model.session(2, 8)
    session.feed([1, 2, 3])
    before = session.last_logits.clone()
    with pytest.raises(st.UserError, match=re.escape(message)):
        session.feed(tokens, **kwargs)
    assert session.seen == [3]
    torch.testing.assert_close(session.last_logits, before, atol=0, rtol=0)


def test_bad_feed_on_a_batch(model):
    session = model.session(2, 8, batch=2)
    with pytest.raises(st.UserError, match="batch=2"):
        session.feed([[1, 2]])  # one list for two streams
    with pytest.raises(st.UserError, match="must be integers"):
        session.feed([[1, 2], [3, 4.5]])
    assert session.seen == [0, 0]




def test_reset_of_a_stream_that_does_not_exist(model):
    session = model.session(2, 8, batch=2)
    with pytest.raises(st.UserError, match="rows"):
        session.reset([5])


GENERATION = [  # (name, call(session, tokenizer), message)
    ("max_new_float", lambda s, t: st.generate_tokens(s, [1], 2.5), "max_new_tokens must be an integer"),
    ("max_new_bool", lambda s, t: st.generate_tokens(s, [1], True), "max_new_tokens must be an integer"),
    ("max_new_negative", lambda s, t: st.generate_tokens(s, [1], -1), "max_new_tokens must be"),
    ("ids_as_text", lambda s, t: st.generate_tokens(s, "hello", 2), "got text"),
    ("ids_floats", lambda s, t: st.generate_tokens(s, [1.5], 2), "must be integers"),
    ("ids_none_fresh", lambda s, t: st.generate_tokens(s, None, 2), "no earlier tokens"),
    ("stop_ids_text", lambda s, t: st.generate_tokens(s, [1], 2, stop_token_ids="2"), "stop_token_ids"),
    ("stop_ids_floats", lambda s, t: st.generate_tokens(s, [1], 2, stop_token_ids=[2.5]), "stop_token_ids"),
    ("stop_ids_number", lambda s, t: st.generate_tokens(s, [1], 2, stop_token_ids=2), "stop_token_ids"),
    ("text_as_ids", lambda s, t: st.generate_text(s, t, [1, 2], 2), "prompt must be text"),
    ("text_empty", lambda s, t: st.generate_text(s, t, "", 2), "prompt is empty"),
    ("temperature_bool", lambda s, t: st.generate_tokens(s, [1], 2, st.SamplingParams(temperature=True)),
     "temperature must be"),
]


@pytest.mark.parametrize("name,call,message", GENERATION, ids=[g[0] for g in GENERATION])
def test_bad_generation_arguments(model, tokenizer, name, call, message):
    session = model.session(2, 8)
    with pytest.raises(st.UserError, match=re.escape(message)):
        list(call(session, tokenizer))
    assert session.seen == [0]


@pytest.mark.parametrize("path,message", [
    ("/nonexistent/model-dir", "no such directory"),
    (5, "must be a str or Path"),
])
def test_load_tokenizer_names_the_problem(path, message):
    with pytest.raises(st.UserError, match=message) as e:
        st.load_tokenizer(path)
    assert "repo" not in str(e.value).lower()  # not the hub's "repo id" message


def test_load_tokenizer_in_a_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(st.UserError, match="no tokenizer files"):
        st.load_tokenizer(tmp_path)
    with pytest.raises(st.UserError, match="not a directory"):
        st.load_tokenizer(tmp_path / "config.json")


@pytest.mark.parametrize("path", [None, 5])
def test_load_model_with_a_path_that_is_not_one(path):
    with pytest.raises(st.UserError):
        st.load_model(path)


# --- the capacity warning: exactly at capacity > max_position_embeddings -------------------------------------

def capacity_warnings(model, sink_tokens, window) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.session(sink_tokens=sink_tokens, window=window)
    return [str(w.message) for w in caught if "max_position_embeddings" in str(w.message)]


@pytest.mark.parametrize("sink_tokens", [0, 4])
def test_capacity_warning_boundary(tiny, sink_tokens):
    assert capacity_warnings(tiny, sink_tokens, MAX_POS - sink_tokens) == []  # capacity == max: fine
    [message] = capacity_warnings(tiny, sink_tokens, MAX_POS - sink_tokens + 1)  # max + 1: warns
    assert f"= {MAX_POS + 1} exceeds" in message and f"window <= {MAX_POS - sink_tokens}" in message


def test_capacity_warning_never_suggests_a_negative_window(tiny):
    [message] = capacity_warnings(tiny, MAX_POS + 10, 8)
    assert not re.search(r"(?<![\w.])-\d", message), message
    assert f"sink_tokens + window <= {MAX_POS}" in message
