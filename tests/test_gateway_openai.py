"""The OpenAI gateway in front of a scripted client (no tritonserver): what it sends the server
(scalar sampling inputs and OPTIONS), logprobs per token streamed and not, /v1/completions, the
text the server released at the end, include_usage, refused parameters as OpenAI errors."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from serving_harness import scripted_gateway
from streaming_trt.serving.client import ServerError
from streaming_trt.serving.protocol import TokenEvent, TurnResult

TOP = {5: [[5, "Hel", -0.5], [6, "He", -1.5]], 6: [[6, "lo", -0.25], [5, "Hel", -2.0]]}


class ScriptedClient:
    """Stands in for streaming_trt.serving.client.Client: replies "Hello" (tokens "Hel", "lo"), with
    logprobs when OPTIONS asks for them; a reply to "tail" ends with text held back till the end."""

    def __init__(self):
        self.turns = []
        self.busy = set()  # texts refused once as BUSY
        self.closed = []  # conversations whose endless reply was closed (cancelled)

    def turn(self, cid, messages, start=False, end=False, resume=False, options=None, **sampling):
        self.turns.append({"cid": cid, "messages": messages, "start": start, "end": end, "options": options,
                           "sampling": sampling})
        logprobs = (options or {}).get("logprobs")
        text = messages if isinstance(messages, str) else (messages[-1]["content"] if messages else "")
        if text == "refused":
            raise ServerError("OPTIONS has an unknown option 'raw'", "invalid")
        if text.startswith("long"):  # a reply without end, in small or 64 KiB pieces, until closed
            try:
                for _ in range(1_000_000):
                    yield TokenEvent(7, "x" * (65536 if text == "long-big" else 1))
                    time.sleep(0.001)
            finally:
                self.closed.append(cid)
            return
        if text in self.busy:
            self.busy.discard(text)
            raise ServerError("any words: every slot is in use", "overloaded")
        for token, piece, lp in ((5, "Hel", -0.5), (6, "lo", -0.25)):
            yield TokenEvent(token, piece, None if logprobs is None else lp,
                        None if not logprobs else TOP[token][:logprobs])
        if text.startswith("slow"):  # the reply is out, its turn not over yet (the server saves it)
            time.sleep(1.5)
        yield TurnResult(prompt_tokens=3, completion_tokens=2, finish_reason="length", seen=10,
                         text=" world" if text == "tail" else "")

    def end(self, cid):
        self.turns.append({"cid": cid, "messages": [], "end": True})

    def close(self, cancel=False):
        pass


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    g = scripted_gateway(ScriptedClient(), tmp_path_factory.mktemp("gw"))
    yield g
    g.stop()


def post(gateway, path: str, body: dict):
    req = urllib.request.Request(f"http://127.0.0.1:{gateway.port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    if raw.startswith("data: "):
        events = [line[6:] for line in raw.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return status, [json.loads(e) for e in events[:-1]]
    return status, json.loads(raw)


def chat(gateway, text: str, **kw):
    return post(gateway, "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], **kw})


def test_the_new_parameters_reach_the_server_as_options(gateway):
    status, body = chat(gateway, "opts", stop=["\n", "END"], frequency_penalty=0.5, presence_penalty=0.1,
                        repetition_penalty=1.2, min_p=0.05, seed=9, temperature=0.5, top_p=0.8, top_k=7,
                        max_tokens=9)
    assert status == 200, body
    sent = gateway.client.turns[-1]
    assert sent["options"] == {"stop": ["\n", "END"], "frequency_penalty": 0.5, "presence_penalty": 0.1,
                               "repetition_penalty": 1.2, "min_p": 0.05}
    assert sent["sampling"] == {"max_tokens": 9, "temperature": 0.5, "top_p": 0.8, "top_k": 7, "seed": 9}
    chat(gateway, "plain")
    assert gateway.client.turns[-1]["options"] is None  # nothing new asked: no OPTIONS input at all


def test_chat_logprobs_whole_and_streamed(gateway):
    status, body = chat(gateway, "lp", logprobs=True, top_logprobs=2)
    assert status == 200 and gateway.client.turns[-1]["options"] == {"logprobs": 2}
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Hello" and choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [(c["token"], c["logprob"], c["bytes"]) for c in content] == [("Hel", -0.5, [72, 101, 108]),
                                                                        ("lo", -0.25, [108, 111])]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["Hel", "He"]
    status, chunks = chat(gateway, "lp2", logprobs=True, stream=True, stream_options={"include_usage": True})
    assert status == 200
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    streamed = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [c["delta"]["content"] for c in streamed] == ["Hel", "lo"]
    assert [c["logprobs"]["content"][0]["logprob"] for c in streamed] == [-0.5, -0.25]
    assert all(c["logprobs"]["content"][0]["top_logprobs"] == [] for c in streamed)  # logprobs without top
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2,
                                                                   "total_tokens": 5}
    status, body = chat(gateway, "nolp")
    assert body["choices"][0]["logprobs"] is None


def test_text_held_back_by_the_server_comes_out_at_the_end(gateway):
    assert chat(gateway, "tail")[1]["choices"][0]["message"]["content"] == "Hello world"
    status, chunks = chat(gateway, "tail", stream=True)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello world"


def test_completions_whole_and_streamed(gateway):
    status, body = post(gateway, "/v1/completions", {"prompt": "Once upon", "max_tokens": 4, "logprobs": 1,
                                                     "stop": "."})
    assert status == 200, body
    sent = gateway.client.turns[-1]
    assert sent["messages"] == "Once upon" and sent["start"] and sent["end"]
    assert sent["options"] == {"stop": ["."], "logprobs": 1, "raw": True}
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] == "Hello" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {"tokens": ["Hel", "lo"], "token_logprobs": [-0.5, -0.25],
                                  "top_logprobs": [{"Hel": -0.5}, {"lo": -0.25}], "text_offset": [0, 3]}
    assert body["usage"]["completion_tokens"] == 2
    status, chunks = post(gateway, "/v1/completions", {"prompt": "tail", "stream": True, "logprobs": 0,
                                                       "stream_options": {"include_usage": True}})
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == "Hello world" and all(c["object"] == "text_completion" for c in chunks)
    offsets = [c["choices"][0]["logprobs"]["text_offset"][0] for c in chunks
               if c["choices"] and c["choices"][0]["logprobs"]]
    assert offsets == [0, 3]
    assert chunks[-1]["usage"]["total_tokens"] == 5
    # a completion is not a conversation to continue: nothing is kept in the map
    assert gateway.app.state.conversations.counts().get("idle", 0) == sum(
        1 for t in gateway.client.turns if isinstance(t["messages"], list) and t["messages"] and not t.get("end"))


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
])
def test_refused_parameters_are_openai_errors(gateway, path, body, param):
    before = len(gateway.client.turns)
    status, err = post(gateway, path, body)
    assert status == 400 and err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"
    assert param in err["error"]["message"]
    assert len(gateway.client.turns) == before  # refused before anything reached the server


def test_a_server_refusal_is_a_400(gateway):
    status, err = post(gateway, "/v1/completions", {"prompt": "refused"})
    assert status == 400 and "unknown option" in err["error"]["message"]


def test_client_repl_sends_the_new_parameters_and_prints_held_back_text(monkeypatch, capsys):
    import io

    from streaming_trt.cli import client as client_module

    scripted = ScriptedClient()

    class Fake(client_module.Client):
        def __init__(self, url, api_key=None):
            self.turn, self.end, self.close = scripted.turn, scripted.end, scripted.close

        def is_server_ready(self):
            return True

    monkeypatch.setattr(client_module, "Client", Fake)
    monkeypatch.setattr("sys.stdin", io.StringIO("tail\n"))
    assert client_module.main(["--frequency-penalty", "0.5", "--min-p", "0.1", "--stop", "X", "--stop", "Y"]) == 0
    assert scripted.turns[-1]["options"] == {"min_p": 0.1, "frequency_penalty": 0.5, "stop": ["X", "Y"]}
    assert capsys.readouterr().out == "Hello world\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert client_module.main([]) == 0 and scripted.turns[-1]["options"] is None


def test_numbers_of_thousands_of_digits_are_a_400(gateway):
    """Python refuses to convert a 5,000-digit integer: the body is refused as bad JSON, not a 500."""
    before = len(gateway.client.turns)
    for field in ("max_tokens", "seed"):
        body = '{"messages": [{"role": "user", "content": "x"}], "%s": %s}' % (field, "9" * 5000)
        req = urllib.request.Request(f"http://127.0.0.1:{gateway.port}/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    assert len(gateway.client.turns) == before


def raw_post(gateway, headers: dict, body: bytes = b'{"messages": [{"role": "user", "content": "x"}]}',
             path="/v1/chat/completions"):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"null")
    conn.close()
    return out


@pytest.mark.parametrize("headers,status,words", [
    ({"Host": "evil.example:8000", "Content-Type": "application/json"}, 421, "--allowed-hosts"),
    ({"Host": "127.0.0.1", "Origin": "https://evil.example", "Content-Type": "application/json"}, 403,
     "--allowed-origins"),
    ({"Host": "localhost:1", "Content-Type": "text/plain"}, 415, "application/json"),
    ({"Host": "[::1]:1"}, 415, "application/json"),
])
def test_browsers_and_misdirected_names_are_refused_at_the_door(gateway, headers, status, words):
    """DNS rebinding (a Host not served), a web page posting cross-site (an Origin), an HTML form's
    text/plain body: refused before anything reaches the server."""
    before = len(gateway.client.turns)
    got, body = raw_post(gateway, headers)
    assert got == status and words in body["error"]["message"], body
    assert len(gateway.client.turns) == before


def test_loopback_names_with_json_pass_the_door(gateway):
    for host in ("127.0.0.1:9", "localhost", "[::1]:80"):
        got, body = raw_post(gateway, {"Host": host, "Content-Type": "application/json; charset=utf-8"})
        assert got == 200, (host, body)


def test_a_busy_continuation_keeps_its_conversation(gateway):
    """429 on a continuation: the conversation is not ended, and the retry sends only the new message."""
    first = [{"role": "user", "content": "one"}]
    status, reply = post(gateway, "/v1/chat/completions", {"messages": first})
    assert status == 200
    history = first + [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                       {"role": "user", "content": "two (busy once)"}]
    cid = gateway.client.turns[-1]["cid"]
    gateway.client.busy.add("two (busy once)")
    status, err = post(gateway, "/v1/chat/completions", {"messages": history})
    assert status == 429, err
    assert not any(t["cid"] == cid and t.get("end") for t in gateway.client.turns)  # not ended
    status, _ = post(gateway, "/v1/chat/completions", {"messages": history})
    assert status == 200
    retry = gateway.client.turns[-1]
    assert retry["cid"] == cid and retry["messages"] == history[-1:] and not retry["start"]


def open_request(port: int, body: dict, rcvbuf: int | None = None) -> socket.socket:
    """Send a chat request on a raw socket and read nothing back."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def wait_closed(client, cid_count: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(client.closed) > cid_count:
            return True
        time.sleep(0.05)
    return False


def test_a_reply_whose_client_left_is_cancelled(gateway):
    """A non-streamed request: the client hangs up while the reply is being made; the turn stops."""
    before = len(gateway.client.closed)
    sock = open_request(gateway.port, {"messages": [{"role": "user", "content": "long"}]})
    time.sleep(0.5)
    sock.close()
    assert wait_closed(gateway.client, before, 10), "the turn went on after its client left"


def test_a_stream_nobody_reads_is_cancelled(tmp_path):
    """A streamed reply the client never reads: once a send has waited send_seconds, the turn stops."""
    g = scripted_gateway(ScriptedClient(), tmp_path, send_seconds=1.0)
    try:
        sock = open_request(g.port, {"messages": [{"role": "user", "content": "long-big"}], "stream": True},
                            rcvbuf=4096)
        try:
            assert wait_closed(g.client, 0, 20), "the turn went on for a client that reads nothing"
        finally:
            sock.close()
    finally:
        g.stop()


# ----------------------------------------------------------------------------------- idempotent turns
def post_with(gateway, body: dict, headers: dict, timeout: float = 30):
    """POST /v1/chat/completions with extra headers; returns (status, headers, parsed body)."""
    req = urllib.request.Request(f"http://127.0.0.1:{gateway.port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def turns_for(client, text: str) -> list[dict]:
    return [t for t in client.turns if t["messages"] and not isinstance(t["messages"], str)
            and t["messages"][-1]["content"] == text]


def test_a_resent_turn_is_answered_from_the_record_not_fed_again(gateway):
    """The same request sent again, with the same Idempotency-Key or (a continuation) the same
    messages, gets the first answer back and reaches the server once (before: it was fed again, as
    a new conversation with its whole history)."""
    first = [{"role": "user", "content": "idem one"}]
    status, h1, a = post_with(gateway, {"messages": first}, {"Idempotency-Key": "k-1"})
    assert status == 200 and h1.get("x-streaming-trt-replayed") is None
    status, h2, b = post_with(gateway, {"messages": first}, {"Idempotency-Key": "k-1"})
    assert status == 200 and h2["x-streaming-trt-replayed"] == "true", b
    assert b["choices"][0]["message"] == a["choices"][0]["message"] and b["usage"] == a["usage"]
    assert h2["x-streaming-trt-conversation"] == h1["x-streaming-trt-conversation"]
    assert len(turns_for(gateway.client, "idem one")) == 1
    status, _, err = post_with(gateway, {"messages": [{"role": "user", "content": "other"}]}, {"Idempotency-Key": "k-1"})
    assert status == 409 and err["error"]["param"] == "Idempotency-Key", err

    history = first + [a["choices"][0]["message"], {"role": "user", "content": "idem two"}]
    status, _, c = post_with(gateway, {"messages": history}, {})
    assert status == 200
    status, h4, d = post_with(gateway, {"messages": history}, {})
    assert status == 200 and h4["x-streaming-trt-replayed"] == "true"
    assert d["choices"][0]["message"]["content"] == c["choices"][0]["message"]["content"]
    sent = turns_for(gateway.client, "idem two")
    assert len(sent) == 1 and sent[0]["messages"] == history[-1:]  # fed once, as a continuation
    status, _, e = post_with(gateway, {"messages": history + [d["choices"][0]["message"],
                                                            {"role": "user", "content": "idem three"}]}, {})
    assert status == 200 and turns_for(gateway.client, "idem three")[0]["messages"] == [
        {"role": "user", "content": "idem three"}]  # the conversation goes on from the one record


def test_a_continuation_sent_before_its_turn_finished_does_not_fork(gateway):
    """The reply is streamed whole but its turn is not over (the server still saves it) when the
    client sends the next message: the gateway waits for the turn and continues the same
    conversation with the new message only (before: a new conversation, the whole history fed)."""
    first = [{"role": "user", "content": "slow first"}]
    req = urllib.request.Request(f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
                                 data=json.dumps({"messages": first, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = ""
        while text != "Hello":  # read the reply's tokens, not the end of the stream
            line = r.readline().decode()
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        cid = int(r.headers["x-streaming-trt-conversation"])
        history = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "slow second"}]
        status, headers, body = post_with(gateway, {"messages": history}, {})
        r.read()
    assert status == 200, body
    assert int(headers["x-streaming-trt-conversation"]) == cid
    sent = turns_for(gateway.client, "slow second")
    assert len(sent) == 1 and sent[0]["cid"] == cid and sent[0]["messages"] == history[-1:] and not sent[0]["start"]


def test_a_resend_of_a_turn_in_flight_waits_for_it(gateway):
    """The same request (same Idempotency-Key) sent twice at once: one turn reaches the server and
    both get its answer."""
    import threading

    body, got = {"messages": [{"role": "user", "content": "slow twice"}]}, []
    threads = [threading.Thread(target=lambda: got.append(post_with(gateway, body, {"Idempotency-Key": "twice"})))
               for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(30)
    assert [g[0] for g in got] == [200, 200]
    assert got[0][2]["choices"][0]["message"] == got[1][2]["choices"][0]["message"]
    assert len(turns_for(gateway.client, "slow twice")) == 1


def closed_within(sock: socket.socket, seconds: float, trickle: bytes) -> float | None:
    """Send ``trickle`` a byte every 0.2 s; the seconds until the server closed the connection (None: it did not)."""
    start = time.monotonic()
    sock.settimeout(0.2)
    for i in range(int(seconds / 0.2)):
        try:
            sock.send(trickle[i % len(trickle): i % len(trickle) + 1])
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except OSError:  # reset or broken pipe: closed
            return time.monotonic() - start
    return None


def test_headers_sent_slowly_are_cut_off(tmp_path):
    """Slow loris: a client sending its headers a byte at a time is disconnected once the header
    time limit passes (before: uvicorn waited for ever), on a fresh connection and after a first
    request on a kept-alive one; other clients are served meanwhile."""
    g = scripted_gateway(ScriptedClient(), tmp_path, header_seconds=1.0)
    try:
        fresh = socket.create_connection(("127.0.0.1", g.port))
        kept = socket.create_connection(("127.0.0.1", g.port))
        body = json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()
        kept.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        kept.settimeout(10)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        trickle = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
        assert chat(g, "meanwhile")[0] == 200
        for sock in (fresh, kept):
            took = closed_within(sock, 8.0, trickle)
            sock.close()
            assert took is not None and took < 4.0, took
    finally:
        g.stop()
