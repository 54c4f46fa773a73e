"""The OpenAI parameters clients send, through the official ``openai`` client on a real tritonserver,
streamed and not: ``stop``, ``logprobs`` / ``top_logprobs``, ``/v1/completions``,
``frequency_penalty``, ``stream_options.include_usage``, and every refused parameter a 400 naming it.
Each reply is checked against the same tokens computed in-process, greedy."""
from __future__ import annotations

import collections

import pytest
import torch

import streaming_trt as st
from serving_harness import (SINK, WINDOW, checkpoint, local, reference, reference_text,  # noqa: F401
                             require_tritonserver, server)

require_tritonserver()
openai = pytest.importorskip("openai", reason="the openai client is not installed")


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.openai}/v1", api_key="unused", timeout=120,
                         max_retries=0)


def ask(api, text: str, stream: bool, **kw):
    """(content, finish_reason, logprobs content list or None, usage) of a one-message chat."""
    messages = [{"role": "user", "content": text}]
    if not stream:
        r = api.chat.completions.create(model="streaming-trt", messages=messages, **kw)
        c = r.choices[0]
        return c.message.content, c.finish_reason, c.logprobs and c.logprobs.content, r.usage
    parts, finish, logprobs, usage = [], None, [], None
    for chunk in api.chat.completions.create(model="streaming-trt", messages=messages, stream=True,
                                             stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        parts.append(c.delta.content or "")
        finish = c.finish_reason or finish
        if c.logprobs and c.logprobs.content:
            logprobs.extend(c.logprobs.content)
    return "".join(parts), finish, logprobs if kw.get("logprobs") else None, usage


def greedy_steps(local, ids: list[int], max_tokens: int, top: int):
    """In-process greedy decoding of ``ids`` on a fresh session: per reply token (id, its
    log-softmax value, the ``top`` most likely (id, logprob)), the stop token left out."""
    from streaming_trt.runtime.generation import eos_ids

    model, tok = local
    stop = eos_ids(tok, model.config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        session = model.session(SINK, WINDOW)
        logits = session.feed(ids, all_logits=False)[0]
        steps = []
        for _ in range(max_tokens):
            logp = torch.log_softmax(logits.double(), -1)
            token = int(logits.argmax())
            if token in stop:
                break
            values, best = torch.topk(logp, top)
            steps.append((token, float(logp[token]), list(zip(best.tolist(), values.tolist()))))
            logits = session.feed([token], all_logits=False)[0]
        return steps
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_ends_before_the_stop_string(api, local, stream):
    text = f"stop test {stream}"
    want = reference_text(local, reference(local, [text], max_tokens=30)[0])
    assert len(want) >= 16, want
    stop = want[8:11]  # three one-character tokens
    content, finish, _, usage = ask(api, text, stream, max_tokens=30, stop=["never-said", stop])
    assert content == want[: want.index(stop)] and finish == "stop"
    assert usage.completion_tokens <= 11


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_text_held_back_for_a_stop_string_is_given_back(api, local, stream):
    text = f"held back {stream}"
    want = reference_text(local, reference(local, [text], max_tokens=30)[0])
    tail = want[-2:] + "\x7f\x7f"  # begins at the reply's end and never completes (\x7f is not in the vocabulary)
    content, finish, _, _ = ask(api, text, stream, max_tokens=30, stop=tail)
    assert content == want and finish in ("length", "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_logprobs_are_the_log_softmax_of_the_runtime_logits(api, local, stream):
    from streaming_trt.runtime.chat import TurnEncoder

    text = f"logprobs test {stream}"
    steps = greedy_steps(local, TurnEncoder(local[1]).first_turn(text), 10, 3)
    content, finish, logprobs, _ = ask(api, text, stream, max_tokens=10, logprobs=True, top_logprobs=3)
    tok = local[1]
    assert content == tok.decode([t for t, _, _ in steps])
    assert len(logprobs) == len(steps)
    for got, (token, logprob, best) in zip(logprobs, steps):
        assert got.token == tok.decode([token]) and got.bytes == list(got.token.encode())
        assert got.logprob == pytest.approx(logprob, abs=1e-4)
        assert [(t.token, round(t.logprob, 4)) for t in got.top_logprobs] == \
            [(tok.decode([i]), round(v, 4)) for i, v in best]
    # logprobs without alternatives
    _, _, only, _ = ask(api, text + "!", stream, max_tokens=4, logprobs=True)
    assert only and all(t.top_logprobs == [] for t in only)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_equal_the_in_process_continuation(api, local, stream):
    model, tok = local
    prompt = f"Once upon a time {int(stream)}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = "".join(st.generate_text(model.session(SINK, WINDOW), tok, prompt, 12))
    finally:
        torch.set_num_threads(threads)
    if not stream:
        r = api.completions.create(model="streaming-trt", prompt=prompt, max_tokens=12, logprobs=2)
        c = r.choices[0]
        assert (c.text, r.object) == (want, "text_completion")
        assert "".join(c.logprobs.tokens) == want and len(c.logprobs.top_logprobs[0]) == 2
        assert c.logprobs.text_offset[0] == 0
        usage = r.usage
    else:
        parts, usage = [], None
        for chunk in api.completions.create(model="streaming-trt", prompt=prompt, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}):
            usage = chunk.usage or usage
            if chunk.choices:
                parts.append(chunk.choices[0].text)
        assert "".join(parts) == want
    assert usage.prompt_tokens == len(tok.encode(prompt)) and usage.completion_tokens >= len(want) > 0


def test_frequency_penalty_breaks_a_greedy_loop(api):
    text = "loop loop loop"
    plain, _, _, _ = ask(api, text, False, max_tokens=40)
    token, count = collections.Counter(plain).most_common(1)[0]  # one character = one token here
    assert count >= 6, plain  # greedy repeats itself on this prompt
    penalised, _, _, _ = ask(api, text, False, max_tokens=40, frequency_penalty=1.0)
    assert penalised.count(token) < count / 2, (plain, penalised)
    presence, _, _, _ = ask(api, text, False, max_tokens=40, presence_penalty=2.0)
    assert presence.count(token) < count, (plain, presence)


REFUSED = [
    ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("chat", "tool_choice", "required"),
    ("chat", "response_format", {"type": "json_object"}),
    ("chat", "n", 2),
    ("chat", "logit_bias", {"5": 10}),
    ("chat", "functions", [{"name": "f", "parameters": {}}]),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat", "reasoning_effort", "high"),
    ("chat", "store", True),
    ("completions", "echo", True),
    ("completions", "best_of", 2),
    ("completions", "suffix", "and then"),
    ("completions", "n", 2),
    ("completions", "logit_bias", {"5": 10}),
]


@pytest.mark.parametrize("endpoint,name,value", REFUSED, ids=[f"{e}-{n}" for e, n, _ in REFUSED])
def test_refused_parameters_get_a_400_naming_them(api, endpoint, name, value):
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            api.chat.completions.create(model="streaming-trt", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=2, **{name: value})
        else:
            api.completions.create(model="streaming-trt", prompt="hi", max_tokens=2, **{name: value})
    assert e.value.status_code == 400 and e.value.param == name and name in e.value.message


def test_unknown_parameters_are_refused_by_name(api):
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="streaming-trt", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=2, extra_body={"temprature": 0.5})
    assert e.value.param == "temprature"
