"""The gateway's ``X-Session-ID`` conversations and its map on a shared session directory, in front
of a scripted client (no tritonserver): a session is one server conversation on every replica
(what it holds recorded beside its session file), continued with only the new message, started
again on any other history; a bad header is a 400 naming it; a turn another replica runs is a 409
the gateway does not end; the map (SQLite) is never on the shared directory, and a replica
starting up never ends another replica's conversation."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from serving_harness import scripted_gateway
from streaming_trt.serving.client import ServerError
from streaming_trt.contract import UserError
from streaming_trt.serving.conversations import SessionKeys, session_conversation
from streaming_trt.serving.protocol import TokenEvent, TurnResult


def user(text):
    return {"role": "user", "content": text}


class Scripted:
    """Stands in for streaming_trt.serving.client.Client; replies "ok"; the text "hold" waits for ``go``,
    "taken" is refused as another replica's turn."""

    def __init__(self):
        self.turns, self.go, self.holding = [], threading.Event(), threading.Event()

    def turn(self, cid, messages, start=False, end=False, resume=False, **sampling):
        self.turns.append((cid, [m["content"] for m in messages], start, end))
        text = messages[-1]["content"] if messages else ""
        if text == "taken":
            raise ServerError("conversation 1 is being continued by host:1; retry in a moment", "conversation_busy")
        if text == "hold":
            self.holding.set()
            self.go.wait(30)
        yield TokenEvent(5, "ok")
        yield TurnResult(prompt_tokens=3, completion_tokens=1, finish_reason="stop", seen=10)

    def end(self, cid):
        self.turns.append((cid, [], False, True))

    def close(self, cancel=False):
        pass


def post(port, messages, session=None, timeout=30):
    headers = {"Content-Type": "application/json"}
    if session is not None:
        headers["X-Session-ID"] = session
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=json.dumps({"messages": messages, "max_tokens": 4}).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def test_a_session_is_one_conversation_on_every_replica(tmp_path):
    """Two gateways on one session directory (a balancer moved the session): the second continues
    what the first recorded, feeding only the new message; an edited history starts it again."""
    shared = tmp_path / "sessions"
    shared.mkdir()
    a = scripted_gateway(Scripted(), tmp_path / "a", session_dir=str(shared))
    b = scripted_gateway(Scripted(), tmp_path / "b", session_dir=str(shared))
    try:
        cid = session_conversation("user-7:chat-1")
        m = [user("hi")]
        status, headers, body = post(a.port, m, "user-7:chat-1")
        assert status == 200 and int(headers["x-streaming-trt-conversation"]) == cid
        assert a.client.turns[-1] == (cid, ["hi"], True, False)  # a new session: START
        m += [body["choices"][0]["message"], user("more")]
        assert post(b.port, m, "user-7:chat-1")[0] == 200
        assert b.client.turns[-1] == (cid, ["more"], False, False)  # continued where A left it
        m += [{"role": "assistant", "content": "ok"}, user("again")]
        assert post(a.port, m, "user-7:chat-1")[0] == 200
        assert a.client.turns[-1] == (cid, ["again"], False, False)
        edited = [user("hi!")] + m[1:]
        assert post(b.port, edited, "user-7:chat-1")[0] == 200
        assert b.client.turns[-1] == (cid, [x["content"] for x in edited], True, False)  # all of it again
        assert (shared / f"{cid:020d}.history").exists()
        assert not list(shared.glob("*.sqlite")), "the map is each replica's own, off the shared directory"
        assert not any(end for _, _, _, end in a.client.turns + b.client.turns)
    finally:
        a.stop()
        b.stop()


def test_a_turn_another_replica_runs_is_a_409_and_nothing_is_ended(tmp_path):
    shared = tmp_path / "sessions"
    shared.mkdir()
    g = scripted_gateway(Scripted(), tmp_path / "g", session_dir=str(shared))
    try:
        assert post(g.port, [user("hi")], "s1")[0] == 200
        m = [user("hi"), {"role": "assistant", "content": "ok"}, user("taken")]
        status, headers, body = post(g.port, m, "s1")
        assert status == 409 and headers["Retry-After"] == "1" and body["error"]["code"] == "conversation_busy"
        assert SessionKeys(shared).get(session_conversation("s1")) is not None, "a refused turn keeps the session"
        _, headers, _ = post(g.port, [user("hello")])  # without a session: the map keeps it too
        mapped = int(headers["x-streaming-trt-conversation"])
        status, _, _ = post(g.port, [user("hello"), {"role": "assistant", "content": "ok"}, user("taken")])
        assert status == 409
        g.app.state.conversations.reap()
        assert not any(end for _, _, _, end in g.client.turns)
        assert g.app.state.conversations.take([user("hello"), {"role": "assistant", "content": "ok"}]) == mapped
    finally:
        g.stop()


@pytest.mark.parametrize("value", ["", "x" * 129, "a b", "ünï", "a/b", "x;y"])
def test_a_bad_session_header_is_a_400_naming_it(tmp_path, value):
    g = scripted_gateway(Scripted(), tmp_path / "g")
    try:
        status, _, body = post(g.port, [user("hi")], value)
        assert status == 400 and body["error"]["param"] == "X-Session-ID", body
        assert "X-Session-ID" in body["error"]["message"] and not g.client.turns
        assert post(g.port, [user("hi")], "A-z_0.9:" + "x" * 120)[0] == 200
    finally:
        g.stop()


def test_the_map_is_never_on_the_shared_dir_and_start_up_ends_nothing_of_another_replica(tmp_path):
    """Replica A has a turn in flight when replica B starts on the same session directory: B ends
    nothing (before: both maps were one SQLite file in the session directory, and B's start-up
    marked A's busy conversation as ending and ended it)."""
    shared = tmp_path / "sessions"
    shared.mkdir()
    with pytest.raises(UserError, match="must not live in the session directory"):
        scripted_gateway(Scripted(), shared, session_dir=str(shared))
    a = scripted_gateway(Scripted(), tmp_path / "a", session_dir=str(shared), reap_interval=0.05)
    b = None
    try:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=post(a.port, [user("hold")])))
        t.start()
        assert a.client.holding.wait(30)
        b = scripted_gateway(Scripted(), tmp_path / "b", session_dir=str(shared), reap_interval=0.05)
        b.app.state.conversations.reap()
        a.client.go.set()
        t.join(30)
        assert result["r"][0] == 200
        assert not any(end for _, _, _, end in a.client.turns + b.client.turns)
        assert not list(shared.glob("*.sqlite"))
    finally:
        a.client.go.set()
        a.stop()
        if b is not None:
            b.stop()
