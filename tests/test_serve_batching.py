"""The batched server under load on a real tritonserver: SIGKILL while turns are in flight, then a
restart. No turn whose final response a client received is lost, no turn is kept half-done, and
every conversation then goes on exactly as the same conversation run alone in-process."""
from __future__ import annotations

import threading
import time

from serving_harness import SINK, WINDOW, Server, checkpoint, local, reference, require_tritonserver, texts_of  # noqa: F401

require_tritonserver()

import streaming_trt as st  # noqa: E402
from streaming_trt.serving.client import Client, Conversation  # noqa: E402
from streaming_trt.serving.journal import read_file  # noqa: E402


def test_sigkill_mid_load_loses_no_acknowledged_turn(checkpoint, local, tmp_path):  # noqa: F811
    n, turns = 6, 6
    expected, seen_after = {}, {}
    for c in range(n):
        seen_after[c] = []
        expected[c] = reference(local, texts_of(c, turns), seen=seen_after[c])
    done = {c: [] for c in range(n)}   # the replies whose final response arrived
    a = Server(checkpoint, tmp_path / "sessions", tmp_path / "a.log")

    def user(c):
        try:
            with Client(a.url, timeout=60) as client:
                conv = client.conversation(700 + c)
                for text in texts_of(c, turns):
                    done[c].append([t.token for t in conv.tokens(text)])
        except Exception:  # the server was killed under this conversation
            pass

    threads = [threading.Thread(target=user, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while sum(len(v) for v in done.values()) < n * 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    a.kill()  # SIGKILL with turns in flight: no shutdown code runs
    for t in threads:
        t.join(60)
    assert sum(len(v) for v in done.values()) < n * turns, "the kill came after every turn: nothing was in flight"
    model = local[0]
    b = Server(checkpoint, tmp_path / "sessions", tmp_path / "b.log")
    try:
        with Client(b.url, timeout=60) as client:
            for c in range(n):
                assert done[c] == expected[c][: len(done[c])], f"conversation {c} before the kill"
                path = tmp_path / "sessions" / f"{700 + c:020d}.session"
                kept = read_file(path, model).seen if path.exists() else 0
                assert kept == 0 or kept in seen_after[c], f"conversation {c}: a half-done turn was kept"
                saved = seen_after[c].index(kept) + 1 if kept else 0
                # every acknowledged turn is on disk; at most the one in flight is there without its final response
                assert len(done[c]) <= saved <= len(done[c]) + 1, (c, len(done[c]), saved)
                conv = Conversation(client, 700 + c, started=saved > 0)
                rest = [[t.token for t in conv.tokens(text)] for text in texts_of(c, turns)[saved:]]
                assert rest == expected[c][saved:], f"conversation {c} after the restart"
    finally:
        b.stop()


def test_recall_server_carries_each_conversations_block_store(checkpoint, local, tmp_path):  # noqa: F811
    """``serve --recall``: conversations past the window, evicted to disk between turns (host memory
    for one) and across a restart, equal the same conversation alone in-process with recall."""
    from streaming_trt.runtime.chat import Chat
    from streaming_trt.runtime.generation import eos_ids
    from streaming_trt.runtime.sampling import Sampler, SamplingParams

    model, tok = local
    recall = st.Recall(block_size=8, top_k=2)
    flags = ["--recall", "--recall-top-k", "2", "--recall-block-size", "8"]
    texts = {c: [f"c{c} " + "long words here " * 8, f"c{c} more", f"c{c} " + "and then some " * 6] for c in range(2)}
    got = {c: [] for c in texts}
    for turns in ((0, 2), (2, 3)):  # a restart between the second and the third turn
        s = Server(checkpoint, tmp_path / "sessions", tmp_path / f"r{turns[0]}.log", max_resident=1, extra=flags)
        try:
            with Client(s.url, timeout=120) as client:
                for t in range(*turns):
                    for c in texts:
                        conv = Conversation(client, 800 + c, started=t > 0)
                        got[c].append([tok_.token for tok_ in conv.tokens(texts[c][t], max_tokens=8)])
        finally:
            s.stop()
    for c in texts:
        session = model.session(SINK, WINDOW, recall=recall)
        chat = Chat(tok, eos_ids(tok, model.config))
        want = [[t for t, _ in chat.reply(session, text, 8, Sampler(SamplingParams(temperature=0.0)))]
                for text in texts[c]]
        assert min(session.recall.count) >= 1, "no block was evicted: recall was not exercised"
        assert got[c] == want, f"conversation {c}"
