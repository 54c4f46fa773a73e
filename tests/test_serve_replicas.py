"""Two replicas (``python -m streaming_trt.cli.serve --openai-port``, each with its own tritonserver) on one
``--session-dir``: a conversation named by ``X-Session-ID`` moves from one to the other (as an L7
balancer moves it when a replica is added or fails) and continues from its last turn, feeding only
the new message; every reply equals the conversation run in-process (greedy); neither replica keeps
its SQLite map on the shared directory."""
from __future__ import annotations

import json
import urllib.request

from serving_harness import (TOKENS, Server, checkpoint, local, reference, reference_text,  # noqa: F401
                             require_tritonserver, texts_of)

require_tritonserver()


def chat(port: int, messages: list[dict], session: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=json.dumps({"messages": messages, "max_tokens": TOKENS}).encode(),
                                 headers={"Content-Type": "application/json", "X-Session-ID": session})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_a_session_moved_to_another_replica_continues_from_its_last_turn(checkpoint, local, tmp_path):
    from streaming_trt.runtime.chat import TurnEncoder

    shared = tmp_path / "sessions"
    a = Server(checkpoint, shared, tmp_path / "a.log", openai=True)
    try:
        b = Server(checkpoint, shared, tmp_path / "b.log", openai=True)
    except BaseException:
        a.stop()
        raise
    try:
        texts = texts_of(5, 5)
        want = [reference_text(local, r) for r in reference(local, texts)]
        turns, messages = TurnEncoder(local[1]), []
        for i, (text, replica) in enumerate(zip(texts, [a, a, b, a, b])):
            messages.append({"role": "user", "content": text})
            r = chat(replica.openai, messages, "session-42")
            reply = r["choices"][0]["message"]["content"]
            assert reply == want[i], f"turn {i} on replica {'ab'[replica is b]}"
            fed = turns.first_turn(text) if i == 0 else turns.next_turn(text)
            assert r["usage"]["prompt_tokens"] == len(fed), f"turn {i} fed more than its new message"
            messages.append({"role": "assistant", "content": reply})
        assert not list(shared.glob("*.sqlite")) and not list(shared.glob("*.sqlite-*"))
        assert len(list(shared.glob("*.session"))) == 1
    finally:
        a.stop()
        b.stop()
