"""Serving pieces that need no tritonserver: the OpenAI gateway's status codes (in front of a
scripted client), its persisted conversation map and orphan reaping, durable private session files."""
from __future__ import annotations

import json
import os
import stat
import threading
import time
import urllib.error
import urllib.request

import pytest

from serving_harness import scripted_gateway
from streaming_trt.serving.client import ServerError
from streaming_trt.serving.conversations import Conversations
from streaming_trt.serving.protocol import TokenEvent, TurnResult


def user(text):
    return {"role": "user", "content": text}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_map_survives_reopening_and_keeps_equal_histories_apart(tmp_path):
    ended = []
    path = tmp_path / "map.sqlite"
    m = Conversations(path, ended.append)
    a, b = m.new(), m.new()
    history = [user("same"), {"role": "assistant", "content": "reply"}]
    m.put(history, a)
    m.put(history, b)
    m.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    m = Conversations(path, ended.append)
    assert {m.take(history), m.take(history)} == {a, b}  # two users, two conversations, neither orphaned
    assert m.take(history) is None
    assert m.reap() == 0 and not ended
    m.close()


def test_map_ends_what_no_request_can_continue(tmp_path):
    """TTL, the count limit, dropped turns and turns left busy by a process that died are ended on
    the server; a server that cannot be reached is tried again at the next reap."""
    ended, clock = [], Clock()
    path = tmp_path / "map.sqlite"
    m = Conversations(path, ended.append, limit=2, ttl=100, clock=clock)
    old, mid, new, dropped = (m.new() for _ in range(4))
    for i, cid in enumerate((old, mid, new)):
        clock.now += 1
        m.put([user(f"h{i}")], cid)
    m.drop(dropped)
    assert m.reap() == 2 and sorted(ended) == sorted([old, dropped])  # over the limit of 2; dropped
    clock.now += 101
    assert m.reap() == 2 and sorted(ended[2:]) == sorted([mid, new])  # past the TTL
    busy = m.new()
    m.close()

    def unreachable(cid):
        raise ServerError("cannot reach the server", "unavailable")

    m = Conversations(path, unreachable, clock=clock)  # a new process: the busy turn was left half-done
    assert m.reap() == 0 and m.counts() == {"ending": 1}
    m.end = ended.append
    assert m.reap() == 1 and ended[-1] == busy and m.counts() == {}
    m.close()


TOGETHER = 60  # more than anyio's default of 40 worker threads


class ScriptedClient:
    """Stands in for streaming_trt.serving.client.Client: the user message says what the "server" does."""

    def __init__(self):
        self.turns = []
        self.together = threading.Barrier(TOGETHER)

    def turn(self, cid, messages, start=False, end=False, resume=False, **sampling):
        self.turns.append((cid, messages, start, end))
        text = messages[-1]["content"] if messages else ""
        for kind in ("invalid", "internal", "overloaded", "unavailable", "timeout"):
            if text == kind:
                raise ServerError(f"scripted {kind}", kind)
        if text == "crash":
            raise RuntimeError("scripted bug")
        if text == "together":  # returns only once TOGETHER turns are in flight at the same time
            self.together.wait(timeout=20)
        yield TokenEvent(5, "hi")
        if text == "midway":
            raise ServerError("scripted break", "unavailable")
        yield TurnResult(prompt_tokens=3, completion_tokens=1, finish_reason="stop", seen=10)

    def end(self, cid):
        self.turns.append((cid, [], False, True))

    def close(self, cancel=False):
        pass


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    g = scripted_gateway(ScriptedClient(), tmp_path_factory.mktemp("gateway"), api_key="k", reap_interval=0.1)
    yield g
    g.stop()


def request(port, body: dict, key="k"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.mark.parametrize("text,status,retry", [("invalid", 400, None), ("internal", 500, None), ("crash", 500, None),
                                               ("overloaded", 429, "1"), ("unavailable", 503, "5"),
                                               ("timeout", 504, None)])
def test_gateway_status_codes_in_openai_shape(gateway, text, status, retry):
    got, headers, body = request(gateway.port, {"messages": [user(text)]})
    error = json.loads(body)["error"]
    assert got == status and headers.get("Retry-After") == retry, (got, body)
    assert set(error) == {"message", "type", "param", "code"} and "scripted" in error["message"]
    assert error["type"] == ("invalid_request_error" if status == 400 else "server_error")


def test_gateway_error_after_the_headers_and_failed_turns_are_ended(gateway):
    got, _, body = request(gateway.port, {"messages": [user("midway")], "stream": True})
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")]
    assert got == 200 and set(events[-1]["error"]) == {"message", "type", "param", "code"}, body
    failed = {cid for cid, messages, start, end in gateway.client.turns if messages and start}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ended = {cid for cid, messages, start, end in gateway.client.turns if end}
        if failed <= ended:
            break
        time.sleep(0.1)
    assert failed <= ended, "a conversation whose turn failed was not ended on the server"


def test_gateway_carries_more_turns_at_once_than_default_worker_threads(gateway):
    """60 requests whose turns all wait for each other: none may queue behind a thread pool."""
    results = []
    threads = [threading.Thread(target=lambda: results.append(request(gateway.port, {"messages": [user("together")]})[0]))
               for _ in range(TOGETHER)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * TOGETHER


def test_gateway_wrong_method_and_key(gateway):
    got, _, body = request(gateway.port, {"messages": [user("hi")]}, key="nope")
    assert got == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    req = urllib.request.Request(f"http://127.0.0.1:{gateway.port}/v1/chat/completions")  # GET
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 405 and set(json.loads(e.value.read())["error"]) == {"message", "type", "param", "code"}


def test_session_save_is_durable_and_private(tmp_path, monkeypatch):
    import streaming_trt as st
    from checkpoints import make_checkpoint

    make_checkpoint(tmp_path / "ckpt", "llama")
    session = st.load_model(tmp_path / "ckpt").session(2, 8)
    session.feed([1, 2, 3])
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "s.session"
    umask = os.umask(0o022)  # the common default, under which files are readable by everyone
    try:
        session.save(path)
    finally:
        os.umask(umask)
    assert synced == [False, True], "the file, then its directory, must reach the disk"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
