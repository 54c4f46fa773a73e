"""Robustness on a real tritonserver (issue 26): a START the backend refuses gives its Triton
sequence slot back at once (before: held for --sequence-idle-seconds, so refused STARTs could pin
every slot).

The server here has 2 sequence slots and a 600 s sequence idle time: a slot held by a refused START
would outlast every client timeout below.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from serving_harness import (Server, checkpoint, local, raw_turn, reference, require_tritonserver,  # noqa: F401
                             run_turns, texts_of)

require_tritonserver()

from streaming_trt.client import Client  # noqa: E402

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
        got = run_turns(client, client.conversation(72000), texts)
        again = run_turns(client, client.conversation(72001), texts[:1])  # both slots are free
    assert got == reference(local, texts)
    assert again == reference(local, texts[:1])
