"""Robustness on a real tritonserver (issue 26): a START the backend refuses gives its Triton
sequence slot back at once (before: held for --sequence-idle-seconds, so refused STARTs could pin
every slot); a turn resent through the gateway is answered from the record and not fed again.

The server here has 2 sequence slots and a 600 s sequence idle time: a slot held by a refused START
would outlast every client timeout below.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from serving_harness import (TOKENS, Server, checkpoint, local, raw_turn, reference,  # noqa: F401
                             reference_text, require_tritonserver, run_turns, texts_of)

require_tritonserver()

from streaming_trt.serving.client import Client  # noqa: E402

SLOTS, IDLE = 2, 600.0


@pytest.fixture(scope="module")
def pinned(checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-pinned")
    s = Server(checkpoint, d / "sessions", d / "serve.log", openai=True,
               extra=["--max-sequences", str(SLOTS), "--sequence-idle-seconds", str(IDLE)])
    yield s
    s.stop()


def messages(text: str):
    return ("MESSAGES", np.frombuffer(json.dumps([{"role": "user", "content": text}]).encode(), np.uint8), "UINT8")


def test_refused_starts_give_back_their_sequence_slots(pinned, local):
    """Two STARTs refused (one at the door: a bad temperature; one by the scheduler: RESUME of a
    conversation that does not exist) on a server with two sequence slots; then a conversation is
    served at once and continues exactly (before: it waited 600 s for a slot, past its timeout)."""
    refused = [raw_turn(pinned.url, [messages("hi"), ("TEMPERATURE", np.array([-1], np.float32), "FP32")], 71000),
               raw_turn(pinned.url, [messages("hi"), ("RESUME", np.array([True]), "BOOL")], 71001)]
    assert "temperature must be" in refused[0] and "unknown" in refused[1], refused
    texts = texts_of(5, 2)
    with Client(pinned.url, timeout=30) as client:
        convs = [client.conversation(72000), client.conversation(72001)]
        got = run_turns(client, convs[0], texts)
        again = run_turns(client, convs[1], texts[:1])  # both slots are free
        for conv in convs:  # END: the next test needs the slots (an idle one would hold its slot 600 s)
            conv.end()
    assert got == reference(local, texts)
    assert again == reference(local, texts[:1])


def post(port: int, messages: list[dict], headers: dict | None = None):
    body = {"model": "streaming-trt", "messages": messages, "max_tokens": TOKENS, "temperature": 0}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def test_a_turn_resent_through_the_gateway_is_fed_once(pinned, local):
    """A continuation sent three times (twice with one Idempotency-Key, once bare) is answered with
    the same reply, marked replayed, and the conversation then goes on exactly as if it had been
    sent once: every reply equals the same conversation run in-process."""
    texts = texts_of(8, 3)
    status, h, first = post(pinned.openai, [{"role": "user", "content": texts[0]}])
    assert status == 200, first
    messages = [{"role": "user", "content": texts[0]}, first["choices"][0]["message"],
                {"role": "user", "content": texts[1]}]
    answers = [post(pinned.openai, messages, headers) for headers in ({"Idempotency-Key": "t-1"},
                                                                      {"Idempotency-Key": "t-1"}, {})]
    assert [a[0] for a in answers] == [200, 200, 200], answers
    assert [a[1].get("x-streaming-trt-replayed") for a in answers] == [None, "true", "true"]
    assert len({a[2]["choices"][0]["message"]["content"] for a in answers}) == 1
    assert {a[1]["x-streaming-trt-conversation"] for a in answers} == {h["x-streaming-trt-conversation"]}
    status, _, third = post(pinned.openai, messages + [answers[0][2]["choices"][0]["message"],
                                                       {"role": "user", "content": texts[2]}])
    assert status == 200, third
    got = [r["choices"][0]["message"]["content"] for r in (first, answers[0][2], third)]
    assert got == [reference_text(local, r) for r in reference(local, texts)]
