"""Serving on a real tritonserver (the one nvidia-pytriton bundles), bound to 127.0.0.1.

Every reply is checked token by token against the same conversation run in-process with
``Session`` (the chat loop's TurnEncoder + generate_tokens), greedy, on a tiny random checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import streaming_trt as st
from checkpoints import make_checkpoint, save_tokenizer
from streaming_trt.errors import UserError

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
try:
    from streaming_trt.serving.repo import find_tritonserver

    find_tritonserver()
except UserError as e:
    pytest.skip(f"no tritonserver to test against: {e}", allow_module_level=True)

from streaming_trt.client import Client, Conversation, ServerError  # noqa: E402

SINK, WINDOW, TOKENS = 4, 40, 6   # the cache rolls after about two turns


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    """``python -m streaming_trt.serve`` in its own process group; ports chosen free."""

    def __init__(self, model_dir: Path, session_dir: Path, log: Path, max_resident: int = 64, openai: bool = False):
        self.http, self.grpc, self.openai = free_ports(3)
        cmd = [sys.executable, "-m", "streaming_trt.serve", "--model", str(model_dir), "--sink-tokens", str(SINK),
               "--window", str(WINDOW), "--threads", "1", "--max-new-tokens", str(TOKENS), "--host", "127.0.0.1",
               "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--session-dir", str(session_dir),
               "--max-resident", str(max_resident), "--max-input-bytes", str(64 * 1024)]
        if openai:
            cmd += ["--openai-port", str(self.openai)]
        self.stderr_path = log
        self._stderr = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True, start_new_session=True)
        ready = threading.Event()
        threading.Thread(target=lambda: (self.proc.stdout.readline(), ready.set()), daemon=True).start()
        if not ready.wait(180) or self.proc.poll() is not None:
            self.stop()
            pytest.fail(f"the server did not become ready; stderr:\n{log.read_text()[-3000:]}")
        self.url = f"127.0.0.1:{self.grpc}"

    def triton_log(self) -> str:
        text = self.stderr_path.read_text()
        path = text.split("(log: ", 1)[1].split(")", 1)[0]
        return Path(path).read_text(errors="replace")

    def pids(self) -> dict[int, int]:
        """pid -> parent pid of every process."""
        out = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        return out

    def stub_pid(self) -> int:
        parents = self.pids()
        triton = [p for p, pp in parents.items() if pp == self.proc.pid]
        stubs = [p for p, pp in parents.items() if pp in triton]
        assert stubs, "no backend stub process found"
        return stubs[0]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._stderr.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._stderr.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-ckpt")
    make_checkpoint(path, "llama", seed=3)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def local(checkpoint):
    """The in-process model and tokenizer the server loads, for the reference runs."""
    return st.load_model(checkpoint), st.load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-main")
    s = Server(checkpoint, d / "sessions", d / "serve.log", openai=True)
    yield s
    s.stop()


def reference(local, texts: list[str], max_tokens: int = TOKENS) -> list[list[int]]:
    """Reply tokens (stop tokens left out) of one conversation run in-process, greedy."""
    from streaming_trt.chat import TurnEncoder
    from streaming_trt.generation import eos_ids

    model, tok = local
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs
    try:
        turns, stop = TurnEncoder(tok), eos_ids(tok, model.config)
        session = model.session(SINK, WINDOW)
        out = []
        for i, text in enumerate(texts):
            ids = turns.first_turn(text) if i == 0 else turns.next_turn(text)
            toks = list(st.generate_tokens(session, ids, max_tokens, stop_token_ids=stop))
            closing = turns.after_reply(toks[-1] if toks and toks[-1] in stop else None)
            if closing:
                session.feed(closing, all_logits=False)
            out.append([t for t in toks if t not in stop])
        return out
    finally:
        torch.set_num_threads(threads)


def texts_of(c: int, turns: int) -> list[str]:
    words = ["sky", "blue", "cat", "runs", "42", "zeta", "lamp", "ok?", "moon", "rain"]
    return [f"c{c} t{t} {words[(c + t) % 10]} {words[(3 * c + t) % 10]}" for t in range(turns)]


def run_turns(client: Client, conv: Conversation, texts: list[str], **kw) -> list[list[int]]:
    return [[t.id for t in conv.tokens(text, **kw)] for text in texts]


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
        with pytest.raises(ServerError, match="unknown or has ended"):
            run_turns(client, conv, ["again"])


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
                    got[c].append([tok.id for tok in convs[c].tokens(texts_of(c, turns)[t])])
        restored = s.triton_log().count("restored from")
    finally:
        s.stop()
    assert restored == n * (turns - 1)
    for c in range(n):
        assert got[c] == reference(local, texts_of(c, turns)), f"conversation {c}"


def raw_turn(url: str, inputs: list[tuple[str, object, str]], seq: int, start: bool = True) -> str:
    """Send hand-made inputs [(name, numpy array, triton dtype)]; returns the error message ('' if none)."""
    import queue

    import tritonclient.grpc as g

    q: queue.Queue = queue.Queue()
    client = g.InferenceServerClient(url)
    client.start_stream(callback=lambda result=None, error=None: q.put((result, error)))
    try:
        tensors = []
        for name, array, dtype in inputs:
            t = g.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            tensors.append(t)
        client.async_stream_infer("streaming_llm", tensors, sequence_id=seq, sequence_start=start)
        while True:
            result, error = q.get(timeout=60)
            if error is not None:
                return error.message()
            if int(result.as_numpy("TOKEN_ID")[0]) < 0:
                return ""
    finally:
        client.stop_stream()
        client.close()


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


def reference_text(local, tokens: list[int]) -> str:
    from streaming_trt.tokenizer import IncrementalDecoder

    decoder = IncrementalDecoder(local[1])
    return "".join(decoder.push(t) for t in tokens)


def test_openai_client_streamed_and_not_equal_in_process_and_reuse_the_prefix(server, local):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    from streaming_trt.chat import TurnEncoder

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

    cases = [
        (post(b"{not json"), 400, "not valid JSON"),
        (chat(messages=[]), 400, "non-empty"),
        (chat(messages=[{"role": "user", "content": " "}]), 400, "empty"),
        (chat(messages=[{"role": "robot", "content": "x"}]), 400, "role"),
        (chat(messages=[{"role": "user", "content": "x" * (1 << 20)}]), 413, "limit"),
        (chat(temperature=3), 400, "temperature"),
        (chat(top_p=0), 400, "top_p"),
        (chat(max_tokens=0), 400, "max_tokens"),
        (chat(model="gpt-4"), 404, "not served"),
    ]
    for (status, body), want_status, words in cases:
        assert status == want_status and words in body["error"]["message"], body
    # a client that goes away mid-stream; the next request is served
    conn = urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(
        {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 100, "stream": True}).encode()), timeout=60)
    assert conn.readline().startswith(b"data: ")
    conn.close()
    status, body = chat()
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_serve_cli_bad_flags_and_write_repo(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "streaming_trt.serve", *args], capture_output=True, text=True,
                              timeout=120)

    for args, words in ((["--max-resident", "0"], "--max-resident"), (["--model", str(tmp_path / "nope")], "no such"),
                        (["--grpc-port", "70000"], "port")):
        r = run(*args)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run("--model", "builtin:random", "--write-repo", str(tmp_path / "repo"), "--session-dir", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    config = (tmp_path / "repo" / "streaming_llm" / "config.pbtxt").read_text()
    assert "decoupled: true" in config and "CONTROL_SEQUENCE_CORRID" in config
    assert "max_sequence_idle_microseconds: 86400000000" in config
    settings = json.loads((tmp_path / "repo" / "streaming_llm" / "serve.json").read_text())
    assert settings["session_dir"] == str((tmp_path / "s").resolve())
    assert "TritonPythonModel" in (tmp_path / "repo" / "streaming_llm" / "1" / "model.py").read_text()


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
