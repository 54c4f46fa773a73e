"""Process harness for the serving tests: a real tritonserver (the one nvidia-pytriton bundles)
started by ``python -m streaming_trt.cli.serve``, bound to 127.0.0.1, on a tiny random checkpoint.

Every reply is checked token by token against the same conversation run in-process with
``Session`` through the same ``Chat`` the chat CLI and the scheduler use, greedy. Test modules that need a
server call :func:`require_tritonserver` at import and import the fixtures they use from here.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import streaming_trt as st
from checkpoints import make_checkpoint, save_tokenizer
from streaming_trt.serving.client import Client, Conversation

SINK, WINDOW, TOKENS = 4, 40, 6   # the cache rolls after about two turns


def require_tritonserver() -> None:
    """Skip the calling test module (at import) when there is no tritonclient or tritonserver."""
    from streaming_trt.contract import UserError

    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    try:
        from streaming_trt.serving.repo import find_tritonserver

        find_tritonserver()
    except UserError as e:
        pytest.skip(f"no tritonserver to test against: {e}", allow_module_level=True)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def conversation_bytes(model_dir: Path) -> int:
    """Host bytes of one idle conversation of the checkpoint: its cache and its newest logits."""
    import json

    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    cache = st.Geometry(SINK, WINDOW).cache_bytes(c["num_hidden_layers"], 1, c["num_key_value_heads"], head_dim,
                                                  torch.float32)
    return cache + 4 * c["vocab_size"]


def wait_free(ports, timeout: float = 30.0) -> None:
    """Wait until nothing listens on ``ports`` of 127.0.0.1 (a killed server's children may a moment longer)."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
                try:
                    s.bind(("127.0.0.1", port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.2)


def scripted_gateway(client, state_dir, **app_kwargs):
    """The OpenAI gateway on a free loopback port in front of ``client``, a scripted stand-in for
    :class:`~streaming_trt.serving.client.Client` (no tritonserver); ``.port`` and ``.client`` are set."""
    pytest.importorskip("uvicorn", reason="the gateway needs uvicorn and starlette")
    from streaming_trt.serving.gateway import GatewayThread

    port = free_ports(1)[0]
    g = GatewayThread("unused", "127.0.0.1", port, client=client, state_dir=str(state_dir), **app_kwargs)
    g.start()
    g.port, g.client = port, client
    return g


class Server:
    """``python -m streaming_trt.cli.serve`` in its own process group; ports chosen free."""

    def __init__(self, model_dir: Path, session_dir: Path, log: Path, max_resident: int = 64, openai: bool = False,
                 extra: list[str] = (), ports: tuple[int, int, int] | None = None):
        self.http, self.grpc, self.openai = ports or free_ports(3)
        if ports:
            wait_free(ports)
        cmd = [sys.executable, "-m", "streaming_trt.cli.serve", "--model", str(model_dir), "--sink-tokens", str(SINK),
               "--window", str(WINDOW), "--threads", "1", "--max-new-tokens", str(TOKENS), "--host", "127.0.0.1",
               "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--session-dir", str(session_dir),
               "--host-memory", str(max_resident * conversation_bytes(model_dir)), "--max-input-bytes", str(64 * 1024)]
        if openai:  # the map is the replica's own, on a local disk beside the test's files
            cmd += ["--openai-port", str(self.openai), "--gateway-state-dir",
                    str(Path(session_dir).parent / f"gateway-{self.openai}")]
        cmd += list(extra)
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


def reference(local, texts: list[str], max_tokens: int = TOKENS, seen: list | None = None) -> list[list[int]]:
    """Reply tokens (stop tokens left out) of one conversation run in-process, greedy, through the
    same :class:`~streaming_trt.runtime.chat.Chat` the server's scheduler uses; ``seen``
    receives the stream length after each turn."""
    from streaming_trt.runtime.chat import Chat
    from streaming_trt.runtime.generation import eos_ids
    from streaming_trt.runtime.sampling import Sampler, SamplingParams

    model, tok = local
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs
    try:
        conv = Chat(tok, eos_ids(tok, model.config))
        session = model.session(SINK, WINDOW)
        out = []
        for text in texts:
            out.append([t for t, _ in conv.reply(session, text, max_tokens, Sampler(SamplingParams(temperature=0.0)))])
            if seen is not None:
                seen.append(session.seen[0])
        return out
    finally:
        torch.set_num_threads(threads)


def texts_of(c: int, turns: int) -> list[str]:
    words = ["sky", "blue", "cat", "runs", "42", "zeta", "lamp", "ok?", "moon", "rain"]
    return [f"c{c} t{t} {words[(c + t) % 10]} {words[(3 * c + t) % 10]}" for t in range(turns)]


def run_turns(client: Client, conv: Conversation, texts: list[str], **kw) -> list[list[int]]:
    return [[t.token for t in conv.tokens(text, **kw)] for text in texts]


def raw_turn(url: str, inputs: list[tuple[str, object, str]], seq: int, start: bool = True,
             headers: dict | None = None) -> str:
    """Send hand-made inputs [(name, numpy array, triton dtype)]; returns the error message ('' if none)."""
    import queue

    import tritonclient.grpc as g

    q: queue.Queue = queue.Queue()
    client = g.InferenceServerClient(url)
    client.start_stream(callback=lambda result=None, error=None: q.put((result, error)), headers=headers)
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
        client.stop_stream(cancel_requests=True)  # a request still waiting (for a sequence slot) must not hang us
        client.close()


def reference_text(local, tokens: list[int]) -> str:
    from streaming_trt.runtime.generation import IncrementalDecoder

    decoder = IncrementalDecoder(local[1])
    return "".join(decoder.push(t) for t in tokens)
