"""Serving over Triton's gRPC stream with ``streaming_trt.serving.client``: replies equal the in-process
run, conversations survive eviction and SIGKILL, bad input is refused, nothing listens beyond loopback."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from serving_harness import (Server, checkpoint, local, raw_turn, reference, require_tritonserver,  # noqa: F401
                             run_turns, server, texts_of)

require_tritonserver()

from streaming_trt.serving.client import Client, Conversation, ServerError  # noqa: E402
from streaming_trt.serving.protocol import ErrorKind  # noqa: E402


def test_sixteen_concurrent_conversations_match_in_process(server, local):
    n, turns = 16, 10
    got: dict[int, list] = {}
    errors = []

    def worker(c):
        try:
            with Client(server.url, timeout=120) as client:
                conv = client.conversation(1000 + c)
                got[c] = run_turns(client, conv, texts_of(c, turns))
                conv.end()
        except Exception as e:  # reported below
            errors.append(f"conversation {c}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    replies = set()
    for c in range(n):
        want = reference(local, texts_of(c, turns))
        assert got[c] == want, f"conversation {c} differs from the in-process run"
        replies.update(tuple(r) for r in want)
    assert len(replies) > 10, "replies barely vary: the test would not see crossed conversations"


def test_end_deletes_the_conversation(server):
    with Client(server.url) as client:
        conv = client.conversation(77)
        run_turns(client, conv, ["hello"])
        files = list((Path(server.stderr_path).parent / "sessions").glob("*77.session"))
        assert len(files) == 1
        conv.end()
        assert not files[0].exists()
        with pytest.raises(ServerError, match="unknown or has ended") as gone:
            run_turns(client, conv, ["again"])
        assert gone.value.kind is ErrorKind.UNKNOWN_CONVERSATION  # decoded from the payload tritonserver carried


def test_sigkill_and_restart_continue_bit_exactly(checkpoint, local, tmp_path):
    n, turns, kill_after = 4, 8, 5
    a = Server(checkpoint, tmp_path / "sessions", tmp_path / "a.log")
    try:
        with Client(a.url) as client:
            first = {c: run_turns(client, client.conversation(500 + c), texts_of(c, kill_after)) for c in range(n)}
    finally:
        a.kill()  # SIGKILL: no shutdown code runs
    assert len(list((tmp_path / "sessions").glob("*.session"))) == n
    b = Server(checkpoint, tmp_path / "sessions", tmp_path / "b.log")
    try:
        with Client(b.url) as client:
            rest = {c: run_turns(client, Conversation(client, 500 + c, started=True), texts_of(c, turns)[kill_after:])
                    for c in range(n)}
    finally:
        b.stop()
    for c in range(n):
        assert first[c] + rest[c] == reference(local, texts_of(c, turns)), f"conversation {c}"


def test_eviction_to_disk_changes_no_reply(checkpoint, local, tmp_path):
    n, turns = 16, 3
    s = Server(checkpoint, tmp_path / "sessions", tmp_path / "s.log", max_resident=4)
    try:
        with Client(s.url) as client:
            convs = [client.conversation(900 + c) for c in range(n)]
            got = {c: [] for c in range(n)}
            for t in range(turns):  # round robin: every later turn finds its session evicted
                for c in range(n):
                    got[c].append([tok.token for tok in convs[c].tokens(texts_of(c, turns)[t])])
        restored = s.triton_log().count("restored from")
    finally:
        s.stop()
    assert restored == n * (turns - 1)
    for c in range(n):
        assert got[c] == reference(local, texts_of(c, turns)), f"conversation {c}"


def test_bad_inputs_get_clear_errors_and_touch_no_other_conversation(server, local):
    import numpy as np

    def msg(text):
        return np.frombuffer(json.dumps([{"role": "user", "content": text}]).encode(), dtype=np.uint8)

    texts = texts_of(5, 4)
    with Client(server.url) as client:
        bystander = client.conversation(4242)
        got = run_turns(client, bystander, texts[:2])
        cases = {
            "unknown conversation": (lambda: raw_turn(server.url, [("MESSAGES", msg("hi"), "UINT8")], 31337, start=False),
                                     "START flag"),
            "missing input": (lambda: raw_turn(server.url, [("TOP_P", np.array([0.5], np.float32), "FP32")], 31338),
                              "MESSAGES"),
            "mistyped input": (lambda: raw_turn(server.url, [("MESSAGES", np.zeros(4, np.float32), "FP32")], 31339),
                               "MESSAGES"),
            "empty message": (lambda: raw_turn(server.url, [("MESSAGES", msg("  "), "UINT8")], 31340), "empty"),
            "1 MB message": (lambda: raw_turn(server.url, [("MESSAGES", msg("x" * (1 << 20)), "UINT8")], 31341),
                             "limit"),
            "invalid JSON": (lambda: raw_turn(server.url, [("MESSAGES", np.frombuffer(b"[{oops", np.uint8), "UINT8")],
                                              31342), "not valid JSON"),
            "temperature": (lambda: raw_turn(server.url, [("MESSAGES", msg("hi"), "UINT8"),
                                                          ("TEMPERATURE", np.array([-1], np.float32), "FP32")], 31343),
                            "temperature must be"),
            "max tokens": (lambda: raw_turn(server.url, [("MESSAGES", msg("hi"), "UINT8"),
                                                         ("MAX_TOKENS", np.array([10**6], np.int32), "INT32")], 31344),
                           "max_tokens must be in"),
        }
        for name, (call, expected) in cases.items():
            message = call()
            assert expected in message, f"{name}: {message!r}"
        # a client that disconnects mid-stream
        quitter = Client(server.url)
        stream = quitter.conversation(4343).tokens("talk for long", max_tokens=100)
        next(stream)
        quitter.close(cancel=True)
        got += run_turns(client, bystander, texts[2:])
        bystander.end()
    assert got == reference(local, texts)


def test_memory_flat_over_500_turns(server):
    def rss_kib(pid):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    stub = server.stub_pid()
    with Client(server.url) as client:
        conv = client.conversation(5005)
        for turn in range(500):
            for _ in conv.tokens(f"turn {turn % 7}", max_tokens=2):
                pass
            if turn == 99:
                early = rss_kib(stub)
        late = rss_kib(stub)
        assert conv.last.seen > 500 * 10  # the stream went far past its window
        conv.end()
    assert late - early < 16 * 1024, f"backend RSS grew {late - early} KiB from turn 100 to 500"


def test_nothing_listens_beyond_loopback(server):
    """Every listening TCP socket of the server's processes is bound to 127.0.0.1."""
    parents = server.pids()
    family = {server.proc.pid}
    while True:
        more = {p for p, pp in parents.items() if pp in family} - family
        if not more:
            break
        family |= more
    inodes = set()
    for pid in family:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                listening.append((table, f[1]))
    ports = {server.http, server.grpc, server.openai}
    assert {int(addr.split(":")[1], 16) for _, addr in listening} == ports
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, and as IPv4-mapped IPv6
    for table, addr in listening:
        assert addr.split(":")[0] in loopback, f"{table}: listens on {addr}"
