"""Serving reliability on a real tritonserver (issue 17, item 4): sequence slots released by idle
conversations and failed STARTs, an error reaching only its own turn, a Client and the REPL across
a server restart, the OpenAI gateway's persisted map and orphan reaping, early refusal of oversized
bodies, the API key on every protocol, status codes, private session files.

One server (``keyed``) runs with 2 Triton sequence slots, a 1 s sequence idle time and an API key,
so every test on it also goes through slot release and RESUME.
"""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serving_harness import (TOKENS, Server, checkpoint, local, raw_turn, reference, reference_text,  # noqa: F401
                             require_tritonserver, run_turns, texts_of)

require_tritonserver()

from streaming_trt.serving.client import Client, Conversation, ServerError  # noqa: E402
from streaming_trt.serving.protocol import ErrorKind  # noqa: E402

KEY = "test-key-3f9c"
SLOTS, IDLE = 2, 1.0


@pytest.fixture(scope="module")
def keyed(checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-keyed")
    s = Server(checkpoint, d / "sessions", d / "serve.log", openai=True,
               extra=["--max-sequences", str(SLOTS), "--sequence-idle-seconds", str(IDLE), "--api-key", KEY])
    s.sessions = d / "sessions"
    yield s
    s.stop()


def post(port: int, body, key: str | None = KEY, timeout: float = 60, raw: bytes | None = None):
    """POST /v1/chat/completions; returns (status, headers, parsed JSON body)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def chat(messages, **kw):
    return {"model": "streaming-trt", "messages": messages, "max_tokens": TOKENS, **kw}


def user(text):
    return {"role": "user", "content": text}


def test_idle_conversations_and_failed_starts_release_their_slots(keyed, local):
    """With 2 sequence slots, 6 conversations that never END, 3 failed STARTs and 3 OpenAI
    conversations are all served in time (before: each held its slot for 24 h, so the third
    conversation waited until the client's timeout), and every conversation continues exactly
    after its slot was released (RESUME from the saved session)."""
    import numpy as np

    headers = {"triton-grpc-protocol-authorization": f"Bearer {KEY}"}
    started = time.monotonic()
    bad = [raw_turn(keyed.url, [("MESSAGES", np.frombuffer(json.dumps([user("hi")]).encode(), np.uint8), "UINT8"),
                                ("TEMPERATURE", np.array([-1], np.float32), "FP32")], 61000 + i, headers=headers)
           for i in range(3)]
    assert all("temperature must be" in m for m in bad), bad
    with Client(keyed.url, timeout=30, api_key=KEY) as client:
        convs = [client.conversation(62000 + c) for c in range(6)]
        got = {c: run_turns(client, convs[c], texts_of(c, 1)) for c in range(6)}
        for c in range(6):
            got[c] += run_turns(client, convs[c], texts_of(c, 2)[1:])
    for i in range(3):
        status, _, body = post(keyed.openai, chat([user(f"new conversation {i}")]), timeout=30)
        assert status == 200, body
    assert time.monotonic() - started < 120
    for c in range(6):
        assert got[c] == reference(local, texts_of(c, 2)), f"conversation {c}"


def test_an_error_reaches_only_its_own_turn(keyed, local):
    """A turn Triton refuses, sent on the same Client while another turn streams, fails alone: the
    streaming turn is neither broken off nor resent (before: the error went to every waiting turn,
    and a continuing one was sent again with START + RESUME, its message fed twice)."""
    texts, n = texts_of(11, 3), 40
    with Client(keyed.url, api_key=KEY) as client:
        conv = client.conversation(63000)
        got = []
        for i, text in enumerate(texts):
            stream = conv.tokens(text, max_tokens=n)
            reply = [next(stream).token]
            if i < 2:
                with pytest.raises(ServerError, match="START flag") as refused:
                    list(client.turn(63001 + i, [user("not started")]))
                assert refused.value.kind is ErrorKind.SEQUENCE_RELEASED
            got.append(reply + [t.token for t in stream])
        conv.end()
    assert got == reference(local, texts, max_tokens=n)


def test_client_and_repl_continue_across_a_server_restart(checkpoint, local, tmp_path):
    """SIGKILL and restart on the same ports: an existing Client and a running REPL continue their
    conversations (the broken gRPC stream is replaced); while the server is down a turn fails with
    a clear error and is not fed; the OpenAI gateway's map survives, so the next request feeds only
    its new message."""
    from streaming_trt.runtime.chat import TurnEncoder

    texts = texts_of(12, 3)
    a = Server(checkpoint, tmp_path / "sessions", tmp_path / "a.log", openai=True)
    ports = (a.http, a.grpc, a.openai)
    repl = subprocess.Popen([sys.executable, "-m", "streaming_trt.cli.client", "--url", a.url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = bytearray(), bytearray()
    for pipe, buf in ((repl.stdout, out), (repl.stderr, err)):
        threading.Thread(target=lambda p=pipe, b=buf: [b.extend(chunk) for chunk in iter(lambda: p.read1(4096), b"")],
                         daemon=True).start()

    def wait_for(buf, what: bytes, timeout=60):
        deadline = time.monotonic() + timeout
        while what not in buf:
            assert time.monotonic() < deadline, f"waited for {what!r}; stdout {bytes(out)!r}, stderr {bytes(err)!r}"
            time.sleep(0.05)

    def say(line):
        repl.stdin.write(line.encode() + b"\n")
        repl.stdin.flush()

    repl_texts = ["repl one", "repl two"]
    want_repl = [reference_text(local, r) for r in reference(local, repl_texts)]
    history = [user("gateway one")]
    b = None
    try:
        with Client(a.url) as client:
            conv = client.conversation(64000)
            got = run_turns(client, conv, texts[:2])
            say(repl_texts[0])
            wait_for(out, (want_repl[0] + "\n").encode())
            status, _, body = post(a.openai, chat(history), key=None)
            assert status == 200, body
            history.append(body["choices"][0]["message"])
            a.kill()
            with pytest.raises(ServerError) as down:
                run_turns(client, conv, ["while it is down"])
            assert down.value.kind == "unavailable" and "server" in str(down.value)
            say("while it is down")
            wait_for(err, b"[error:")
            b = Server(checkpoint, tmp_path / "sessions", tmp_path / "b.log", openai=True, ports=ports)
            got += run_turns(client, conv, texts[2:])
            say(repl_texts[1])
            wait_for(out, (want_repl[0] + "\n" + want_repl[1] + "\n").encode())
            history.append(user("gateway two"))
            status, _, body = post(b.openai, chat(history), key=None)
            assert status == 200, body
        repl.stdin.close()
        assert repl.wait(30) == 0
    finally:
        repl.kill()
        if b is not None:
            b.stop()
    assert got == reference(local, texts)
    assert bytes(out) == (want_repl[0] + "\n" + want_repl[1] + "\n").encode()
    assert b"Traceback" not in err, bytes(err)
    assert body["usage"]["prompt_tokens"] == len(TurnEncoder(local[1]).next_turn("gateway two"))


def test_api_key_guards_the_gateway_and_triton(keyed):
    """Without the key: 401 (OpenAI's shape) from the gateway, refused by Triton's gRPC and HTTP
    endpoints; health stays open; with it, served."""
    status, _, body = post(keyed.openai, chat([user("hi")]), key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key", body
    status, _, body = post(keyed.openai, chat([user("hi")]), key=KEY + "x")
    assert status == 401, body
    req = urllib.request.Request(f"http://127.0.0.1:{keyed.openai}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401
    req.add_header("Authorization", f"Bearer {KEY}")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.loads(r.read())["data"][0]["id"] == "streaming-trt"
    with Client(keyed.url, timeout=30) as client, pytest.raises(ServerError):
        list(client.turn(65000, [user("hi")], start=True))
    with Client(keyed.url, timeout=30, api_key=KEY) as client:
        conv = client.conversation(65001)
        assert run_turns(client, conv, ["hi"])[0]
        conv.end()
    triton = f"http://127.0.0.1:{keyed.http}"
    with urllib.request.urlopen(f"{triton}/v2/health/ready", timeout=30) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{triton}/v2/models/streaming_llm/config", timeout=30)
    req = urllib.request.Request(f"{triton}/v2/models/streaming_llm/config", headers={"authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.loads(r.read())["name"] == "streaming_llm"


def test_session_files_are_private(keyed):
    with Client(keyed.url, api_key=KEY) as client:
        run_turns(client, client.conversation(66000), ["hello"])
    files = list(keyed.sessions.glob("*.session")) + list(keyed.sessions.glob("*.sqlite"))
    assert files
    for f in files:
        assert f.stat().st_mode & 0o077 == 0, f"{f.name} is mode {f.stat().st_mode & 0o777:o}"


def in_gateway_map(sessions: Path, cid: int) -> bool:
    import sqlite3

    [path] = sessions.parent.glob("gateway-*/openai-conversations.sqlite")  # the replica's own, not the shared dir
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM conversations WHERE cid = ?", (cid,)).fetchone()[0] > 0
    finally:
        db.close()


def test_gateway_reaps_orphans_and_keeps_two_users_apart(keyed, local):
    """A client that leaves mid-stream: its conversation is ended on the server (before: it stayed
    on disk forever). Two users who send the same first message each continue their own
    conversation, feeding only their new message (before: the second one's map entry replaced the
    first's, orphaning it, and the first user's next turn fed its whole history)."""
    from streaming_trt.runtime.chat import TurnEncoder

    conn = urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{keyed.openai}/v1/chat/completions",
        data=json.dumps(chat([user("talk for long")], max_tokens=100, stream=True)).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}), timeout=60)
    cid = int(conn.headers["x-streaming-trt-conversation"])
    assert conn.readline().startswith(b"data: ")
    conn.close()
    deadline = time.monotonic() + 30
    while in_gateway_map(keyed.sessions, cid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not in_gateway_map(keyed.sessions, cid), "the gateway still lists the conversation its client left"
    with Client(keyed.url, api_key=KEY) as client, pytest.raises(ServerError, match="unknown or has ended") as gone:
        Conversation(client, cid, started=True).end()  # the gateway ended it already
    assert gone.value.kind is ErrorKind.UNKNOWN_CONVERSATION
    assert not (keyed.sessions / f"{cid:020d}.session").exists()

    first = [user("the same first message")]
    replies = []
    for _ in range(2):
        status, headers, body = post(keyed.openai, chat(first))
        assert status == 200, body
        replies.append((int(headers["x-streaming-trt-conversation"]), body["choices"][0]["message"]))
    assert replies[0][0] != replies[1][0] and replies[0][1] == replies[1][1]
    turns, continued = TurnEncoder(local[1]), set()
    for i, (_, reply) in enumerate(replies):  # the histories are equal: either conversation continues either
        text = f"user {i} goes on"
        status, headers, body = post(keyed.openai, chat(first + [reply, user(text)]))
        assert status == 200, body
        continued.add(int(headers["x-streaming-trt-conversation"]))
        assert body["usage"]["prompt_tokens"] == len(turns.next_turn(text)), f"user {i} fed the whole history again"
    assert continued == {cid for cid, _ in replies}


def raw_http(port: int, head: bytes, body: bytes, timeout: float = 10) -> bytes:
    """Send a request head and the start of a body, never finishing it; the response's first line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        return s.makefile("rb").readline()


def test_oversized_bodies_are_refused_before_they_are_read(keyed):
    """A body over the limit is refused from its Content-Length, and a chunked one as soon as it
    passes the limit, with the rest never sent (before: the gateway waited for the whole body)."""
    limit = 64 * 1024
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\n").encode()
    line = raw_http(keyed.openai, head + b"Content-Length: 1000000000\r\n\r\n", b'{"messages": [')
    assert b" 413 " in line, line
    chunk = b"x" * (limit + 1)
    line = raw_http(keyed.openai, head + b"Transfer-Encoding: chunked\r\n\r\n",
                    f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    assert b" 413 " in line, line
    status, _, body = post(keyed.openai, None, raw=b"[" * 60_000)
    assert status == 400 and "nested too deeply" in body["error"]["message"], body
    status, _, body = post(keyed.openai, None, raw=b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert status == 400 and "surrogate" in body["error"]["message"], body
    conn = http.client.HTTPConnection("127.0.0.1", keyed.openai, timeout=30)
    conn.request("GET", "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 404 and set(json.loads(r.read())["error"]) == {"message", "type", "param", "code"}
    conn.close()
