"""The OpenAI-compatible gateway (``--openai-port``): the openai client streamed and not, prefix
reuse, and bad requests with OpenAI-shaped errors."""
from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import pytest

from serving_harness import (TOKENS, checkpoint, local, reference, reference_text,  # noqa: F401
                             require_tritonserver, server, texts_of)

require_tritonserver()


def test_openai_client_streamed_and_not_equal_in_process_and_reuse_the_prefix(server, local):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    from streaming_trt.runtime.chat import TurnEncoder

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{server.openai}/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in api.models.list().data] == ["streaming-trt"]
    texts = texts_of(9, 4)
    want = [reference_text(local, r) for r in reference(local, texts)]
    turns = TurnEncoder(local[1])
    messages = []
    for i, text in enumerate(texts):
        messages.append({"role": "user", "content": text})
        if i % 2 == 0:
            r = api.chat.completions.create(model="streaming-trt", messages=messages, max_tokens=TOKENS)
            reply, usage = r.choices[0].message.content, r.usage
        else:
            parts, usage = [], None
            for chunk in api.chat.completions.create(model="streaming-trt", messages=messages, max_tokens=TOKENS,
                                                     stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                usage = chunk.usage or usage
            reply = "".join(parts)
        assert reply == want[i], f"turn {i}"
        fed = turns.first_turn(text) if i == 0 else turns.next_turn(text)
        assert usage.prompt_tokens == len(fed), f"turn {i} fed {usage.prompt_tokens} tokens, not only the new message"
        messages.append({"role": "assistant", "content": reply})
    # An edited history is another conversation: all of it is fed again.
    edited = [dict(m) for m in messages]
    edited[1]["content"] += "!"
    edited.append({"role": "user", "content": "and now?"})
    r = api.chat.completions.create(model="streaming-trt", messages=edited, max_tokens=TOKENS)
    tok = local[1]
    full = tok.encode(tok.apply_chat_template(edited, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)
    assert r.usage.prompt_tokens == len(full)


def test_openai_bad_requests(server):
    url = f"http://127.0.0.1:{server.openai}/v1/chat/completions"

    def post(body: bytes):
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def chat(**kw):
        body = {"model": "streaming-trt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        body.update(kw)
        return post(json.dumps(body).encode())

    def announce(length: int):
        """Headers saying ``length`` bytes follow, none sent: the refusal comes from the Content-Length
        (sending the body while the server closes the connection could break the pipe first)."""
        conn = http.client.HTTPConnection("127.0.0.1", server.openai, timeout=60)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        r = conn.getresponse()
        try:
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    cases = [
        (post(b"{not json"), 400, "not valid JSON"),
        (chat(messages=[]), 400, "non-empty"),
        (chat(messages=[{"role": "user", "content": " "}]), 400, "empty"),
        (chat(messages=[{"role": "robot", "content": "x"}]), 400, "role"),
        (announce(1 << 20), 413, "limit"),
        (chat(temperature=3), 400, "temperature"),
        (chat(top_p=0), 400, "top_p"),
        (chat(max_tokens=0), 400, "max_tokens"),
        (chat(model="gpt-4"), 404, "not served"),
    ]
    for (status, body), want_status, words in cases:
        assert status == want_status and words in body["error"]["message"], body
    # a client that goes away mid-stream; the next request is served
    conn = urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(
        {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 100, "stream": True}).encode(),
        headers={"Content-Type": "application/json"}), timeout=60)
    assert conn.readline().startswith(b"data: ")
    conn.close()
    status, body = chat()
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
