"""The wire protocol (streaming_trt.serving.protocol) without a tritonserver.

- The schema is defined once: the written config.pbtxt, the tensors the Triton backend reads and
  writes, and what the client sends all equal protocol's INPUTS / OUTPUTS.
- Error kinds survive a reworded message: every ServingError's text is replaced by other words,
  and the whole chain (scheduler -> backend -> a stand-in for Triton's gRPC stream -> client ->
  OpenAI gateway) still tells the kinds apart: the client's exception kind, the gateway's status,
  the gateway's restart of a conversation the server no longer has, the client's resume.
"""
from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import streaming_trt as st
from checkpoints import tiny_chat_model
from serving_harness import free_ports
from streaming_trt.contract import UserError
from streaming_trt.serving import protocol
from streaming_trt.serving.protocol import ErrorKind, ServingError, TokenEvent, TurnResult

SINK, WINDOW = 4, 40
LIMIT = 50  # the scheduler's max_new_tokens_limit


# ------------------------------------------------------------------ Triton stand-ins
class FakePb:
    """The parts of ``triton_python_backend_utils`` the backend uses."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        @staticmethod
        def from_dlpack(name, capsule):
            return FakePb.Tensor(name, torch.utils.dlpack.from_dlpack(capsule).numpy().copy())

        def to_dlpack(self):
            return torch.utils.dlpack.to_dlpack(torch.from_numpy(self.array.copy()))

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors, error

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    read: list = []  # names of the inputs the backend asked for

    @staticmethod
    def get_input_tensor_by_name(request, name):
        FakePb.read.append(name)
        return request.inputs.get(name)


class FakeRequest:
    def __init__(self, inputs, flags, cid, sender):
        self.inputs, self._flags, self._cid, self.sender = inputs, flags, cid, sender

    def flags(self):
        return self._flags

    def correlation_id(self):
        return self._cid

    def get_response_sender(self):
        return self.sender


class FakeError:
    """An in-band error as tritonclient reports it: a message, no gRPC status."""

    def __init__(self, message):
        self._message = message

    def message(self):
        return self._message

    def status(self):
        return None


class FakeResult:
    def __init__(self, tensors):
        self.tensors = {t.name: t.array for t in tensors}

    def as_numpy(self, name):
        return self.tensors.get(name)


class FakeGrpc:
    """``tritonclient.grpc`` over an in-process backend: what Triton's gRPC stream carries, no more.
    ``released``: conversation ids whose sequence Triton released (a request without START is
    refused with Triton's own words, as Triton 2.51 says it)."""

    def __init__(self, backend):
        self.backend, self.released, self.sent = backend, set(), []
        self.gates: dict[int, threading.Event] = {}  # a conversation's token responses wait for its gate
        grpc = self

        class InferInput:
            def __init__(self, name, shape, datatype):
                self.name, self.shape, self.datatype, self.array = name, shape, datatype, None

            def set_data_from_numpy(self, array):
                from tritonclient.utils import np_to_triton_dtype

                assert np_to_triton_dtype(array.dtype) == self.datatype and list(array.shape) == self.shape
                self.array = array

        class InferenceServerClient:
            def __init__(self, url):
                self.callback = None

            def start_stream(self, callback, headers=None):
                self.callback = callback

            def async_stream_infer(self, model_name, inputs, request_id="", sequence_id=0, sequence_start=False,
                                   sequence_end=False):
                assert model_name == protocol.MODEL_NAME
                grpc.sent.append({i.name: (i.datatype, i.shape) for i in inputs})
                callback = self.callback
                if sequence_id in grpc.released and not sequence_start:
                    callback(error=FakeError(f"inference request for sequence {sequence_id} to model "
                                             f"'{model_name}' must specify the START flag on the first request "
                                             "of the sequence"))
                    return
                grpc.released.discard(sequence_id)

                gate = grpc.gates.get(sequence_id)

                class Sender:
                    def send(self, response, flags=0):
                        if gate is not None:
                            gate.wait(30)
                        if response.error is not None:
                            callback(error=FakeError(response.error.message()))
                        else:
                            callback(result=FakeResult(response.output_tensors))

                    def is_cancelled(self):
                        return False

                flags = (protocol.FLAG_START if sequence_start else 0) | (protocol.FLAG_END if sequence_end else 0)
                tensors = {i.name: FakePb.Tensor(i.name, i.array) for i in inputs}
                grpc.backend.execute([FakeRequest(tensors, flags, sequence_id, Sender())])

            def stop_stream(self, cancel_requests=False):
                pass

            def close(self):
                pass

        self.InferInput, self.InferenceServerClient = InferInput, InferenceServerClient


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("protocol-model"))


@pytest.fixture
def wire(local, tmp_path):
    """A real scheduler behind the real backend, a client over the stand-in stream."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    from streaming_trt.serving.client import Client
    from streaming_trt.serving.tritonserver_model import TritonPythonModel
    from streaming_trt.serving.scheduler import Scheduler
    from streaming_trt.serving.store import ConversationStore

    model, tok = local
    store = ConversationStore(model, st.Geometry(SINK, WINDOW), tmp_path / "sessions", 1 << 30)
    backend = TritonPythonModel()
    backend.pb, backend.settings = FakePb, {"max_input_bytes": 64 * 1024}
    backend.scheduler = Scheduler(model, tok, store, slots=1, max_queue=1, max_new_tokens=4,
                                  max_new_tokens_limit=LIMIT)
    grpc = FakeGrpc(backend)
    client = Client("127.0.0.1:1", timeout=60)
    client._grpc = grpc
    yield client, backend, grpc, store
    client.close()
    backend.scheduler.close()


def reword(monkeypatch):
    """Every ServingError (the scheduler's, the protocol's, the client's) says something else."""
    original = ServingError.__init__

    def reworded(self, message, kind=None):
        original(self, f"Ç'est autre chose ({len(message)})", kind)

    monkeypatch.setattr(ServingError, "__init__", reworded)


# ------------------------------------------------------------------ the schema, once
def pbtxt_tensors(text: str, section: str) -> list[tuple[str, str, tuple[int, ...], bool]]:
    body = re.search(rf"^{section} \[\n(.*?)^\]", text, re.S | re.M).group(1)
    out = []
    for line in body.splitlines():
        m = re.match(r'\s*\{ name: "(\w+)" data_type: TYPE_(\w+) dims: \[ ([-\d, ]+) \]( optional: true)? \},?$', line)
        assert m, line
        out.append((m[1], m[2], tuple(int(d) for d in m[3].split(",")), bool(m[4])))
    return out


def spec(tensors) -> list[tuple[str, str, tuple[int, ...], bool]]:
    return [(t.name, t.dtype, t.dims, t.optional) for t in tensors]


def test_config_backend_and_client_take_the_schema_from_protocol(tmp_path, wire):
    from streaming_trt.serving.repo import write_repo

    config = (write_repo(tmp_path / "repo", {}) / "config.pbtxt").read_text()
    assert f'name: "{protocol.MODEL_NAME}"' in config
    assert pbtxt_tensors(config, "input") == spec(protocol.INPUTS)
    assert pbtxt_tensors(config, "output") == spec(protocol.OUTPUTS)
    declared = {name: dtype for name, dtype, _, _ in pbtxt_tensors(config, "input") + pbtxt_tensors(config, "output")}

    client, backend, grpc, _ = wire
    # every output the backend writes, with its dtype, for a token and for a turn's end
    for item in (TokenEvent(7, "hé", -0.5, [[7, "hé", -0.5]]), TurnResult(3, 2, "stop", 12, "tail")):
        tensors = backend._response(item).output_tensors
        from tritonclient.utils import np_to_triton_dtype

        assert [(t.name, np_to_triton_dtype(t.array.dtype)) for t in tensors] == [(t.name, t.dtype) for t in protocol.OUTPUTS]
        assert protocol.decode_response(FakeResult(tensors).as_numpy) == item
    # what the client sends and what the backend reads are config inputs, dtypes included
    FakePb.read.clear()
    chat = client.conversation()
    list(chat.tokens("hi", max_tokens=2, temperature=0.0, top_k=0, top_p=1.0, seed=1,
                     options={"min_p": 0.0, "stop": ["zz"], "logprobs": 1}))
    assert chat.last.finish_reason in ("stop", "length") and chat.last.completion_tokens >= 1
    sent = grpc.sent[-1]
    assert set(sent) == {"MESSAGES", "MAX_TOKENS", "TEMPERATURE", "TOP_K", "TOP_P", "SEED", "OPTIONS"}
    assert all(declared[name] == dtype for name, (dtype, _) in sent.items())
    assert set(FakePb.read) == {t.name for t in protocol.INPUTS}


# ------------------------------------------------------------------ error kinds, reworded
def test_error_kinds_survive_a_reworded_message_end_to_end(wire, monkeypatch):
    from streaming_trt.serving.client import ServerError

    reword(monkeypatch)
    client, backend, grpc, store = wire
    sched = backend.scheduler

    def kind_of(call):
        with pytest.raises(ServerError) as e:
            call()
        assert "autre chose" in str(e.value)  # the words changed...
        return e.value.kind                   # ...the kind did not

    # a conversation the server does not have
    assert kind_of(lambda: list(client.turn(31337, [{"role": "user", "content": "hi"}]))) is ErrorKind.UNKNOWN_CONVERSATION
    # over the server's limit; bad OPTIONS; a bad message list
    assert kind_of(lambda: list(client.turn(5, [{"role": "user", "content": "hi"}], start=True,
                                            max_tokens=LIMIT + 1))) is ErrorKind.BAD_REQUEST
    assert kind_of(lambda: list(client.turn(5, [{"role": "user", "content": "hi"}], start=True,
                                            options={"nonsense": 1}))) is ErrorKind.BAD_REQUEST
    assert kind_of(lambda: list(client.turn(5, [{"role": "user", "content": "hi"}], start=True,  # > 64 KiB
                                            options={"stop": ["y" * 1000] * 70}))) is ErrorKind.BAD_REQUEST
    # a server bug while admitting the turn
    with monkeypatch.context() as m:
        m.setattr(store, "exists", lambda cid: (_ for _ in ()).throw(RuntimeError("disk on fire")))
        assert kind_of(lambda: list(client.turn(6, [{"role": "user", "content": "hi"}]))) is ErrorKind.INTERNAL
    # busy: the one slot holds a turn (its first token waits at the gate) and the one queue place is taken
    hold = grpc.gates[7] = threading.Event()
    waiting = []

    def long_turn(cid):
        try:
            list(client.turn(cid, [{"role": "user", "content": "long " * 5}], start=True, max_tokens=LIMIT))
        except ServerError as e:
            waiting.append(e.kind)

    first = threading.Thread(target=long_turn, args=(7,))
    first.start()
    while sched.free_slots():
        threading.Event().wait(0.01)
    queued = threading.Thread(target=long_turn, args=(8,))
    queued.start()
    while sched.queued < 1:
        threading.Event().wait(0.01)
    assert kind_of(lambda: list(client.turn(9, [{"role": "user", "content": "hi"}], start=True))) is ErrorKind.BUSY
    # shutting down: the queued turn is refused, the one in flight finishes
    closing = threading.Thread(target=sched.close)
    closing.start()
    while not sched.stopping.is_set():
        threading.Event().wait(0.01)
    hold.set()
    first.join(60)
    queued.join(60)
    closing.join(60)
    assert waiting == [ErrorKind.SHUTTING_DOWN]


def test_the_client_resumes_a_released_sequence(wire, monkeypatch):
    """Triton's own refusal (its words, no code of ours) -> START + RESUME, and the conversation
    continues: the same tokens as one that was never released."""
    reword(monkeypatch)
    client, backend, grpc, _ = wire
    a, b = client.conversation(11), client.conversation(12)
    first = [[t.token for t in c.tokens("hello there")] for c in (a, b)]
    grpc.released.add(11)
    second = [[t.token for t in c.tokens("go on")] for c in (a, b)]
    assert first[0] == first[1] and second[0] == second[1]
    assert "RESUME" in grpc.sent[-2] and grpc.sent[-3].keys() == grpc.sent[-2].keys() - {"RESUME"}  # refused, resent
    grpc.released.add(11)
    a.end()  # END on a released sequence: resent with START + RESUME
    assert not backend.scheduler.store.exists(11)


def test_a_resent_continuation_is_fed_at_most_once(wire, monkeypatch):
    """A continuation sent again carries the stream length its client last saw (OPTIONS ``after``):
    refused as ALREADY_DONE when the server applied it already (its answer was lost on the way), fed
    when it did not (its save failed); the conversation ends as if each message was sent once, the
    same tokens as a conversation that never saw an error (before: a resend was fed twice)."""
    import copy

    from streaming_trt.serving.client import ServerError

    client, backend, grpc, store = wire
    a, ref = client.conversation(21), client.conversation(22)
    for c in (a, ref):
        list(c.tokens("hello there"))
    lost = copy.copy(a)  # a client that sent "go on" and never heard back
    went_on = [t.token for t in a.tokens("go on")]
    with pytest.raises(ServerError) as refused:
        list(lost.tokens("go on"))
    assert refused.value.kind is ErrorKind.ALREADY_DONE and "not fed again" in str(refused.value)
    assert store.seen(21) == a.last.seen

    save, failed = store.journal.save, []

    def full_disk_once(cid, state):
        if not failed:
            failed.append(cid)
            raise OSError("no space left on device")
        return save(cid, state)

    monkeypatch.setattr(store.journal, "save", full_disk_once)
    with pytest.raises(ServerError) as lost_save:
        list(a.tokens("third"))
    assert lost_save.value.kind is ErrorKind.INTERNAL and failed == [21]
    third = [t.token for t in a.tokens("third")]  # sent again: fed once, from the saved turn
    assert [went_on, third] == [[t.token for t in ref.tokens(text)] for text in ("go on", "third")]
    assert store.seen(21) == store.seen(22) == a.last.seen


class ScriptedClient:
    """Stands in for the Client: a turn raises ServerError(kind) for a user message naming a kind."""

    def __init__(self):
        self.turns = []

    def turn(self, cid, messages, start=False, end=False, resume=False, **kw):
        from streaming_trt.serving.client import ServerError

        self.turns.append((cid, start))
        text = messages[-1]["content"] if messages else ""
        if text in {k.value for k in ErrorKind}:
            raise ServerError(f"words nobody matches {text[::-1]}", text)
        yield TokenEvent(5, "hi")
        yield TurnResult(3, 1, "stop", 10)

    def end(self, cid):
        pass

    def close(self, cancel=False):
        pass


def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_gateway_status_follows_the_kind_not_the_words(kind, tmp_path):
    from serving_harness import scripted_gateway

    g = scripted_gateway(ScriptedClient(), tmp_path)
    try:
        status, headers, body = post(g.port, {"messages": [{"role": "user", "content": kind.value}]})
    finally:
        g.stop()
    http = protocol.HTTP[kind]
    assert status == http.status and body["error"]["code"] == http.code, body
    assert headers.get("Retry-After") == (None if http.retry_after is None else str(http.retry_after))


def test_gateway_restarts_a_conversation_the_server_lost_whatever_the_words(wire, tmp_path, monkeypatch):
    """The whole chain: the server ended a conversation (its TTL); the gateway's next request for it
    is refused as UNKNOWN_CONVERSATION in other words, and the gateway starts it over with the
    whole history: 200, and the same reply as a new conversation with that whole history."""
    pytest.importorskip("uvicorn", reason="the gateway needs uvicorn and starlette")
    from streaming_trt.serving.gateway import GatewayThread

    reword(monkeypatch)
    client, backend, grpc, store = wire
    port = free_ports(1)[0]
    g = GatewayThread("unused", "127.0.0.1", port, client=client, state_dir=str(tmp_path / "gw"))
    g.start()
    try:
        history = [{"role": "user", "content": "hello there"}]
        status, headers, body = post(port, {"messages": history, "max_tokens": 3})
        assert status == 200, body
        cid = int(headers["x-streaming-trt-conversation"])
        history += [body["choices"][0]["message"], {"role": "user", "content": "go on"}]
        store.end(cid)  # the server forgot it
        status, headers, lost = post(port, {"messages": history, "max_tokens": 3})
        assert status == 200, lost
        assert int(headers["x-streaming-trt-conversation"]) != cid
        status, _, fresh = post(port, {"messages": history, "max_tokens": 3})  # a new conversation: whole history
        assert status == 200 and lost["choices"][0]["message"] == fresh["choices"][0]["message"]
    finally:
        g.stop()


def test_requests_are_validated_once_when_made():
    """A TurnRequest holds parsed, checked fields; bad ones are refused with kind BAD_REQUEST."""
    req = protocol.TurnRequest(3, b'[{"role": "user", "content": "hi"}]', stop="x", sampling={"temperature": 0.5})
    assert req.messages == [{"role": "user", "content": "hi"}] and req.stop == ("x",)
    assert req.sampling.temperature == 0.5
    for bad in (dict(messages=b"\xff"), dict(messages="[{oops"), dict(messages='"text"'),
                dict(messages="[]", raw=True), dict(messages="[]", max_tokens=-1), dict(messages="[]", logprobs=21),
                dict(messages="[]", stop=[1]), dict(messages="[]", sampling={"top_p": 0}), dict(cid=0, messages="[]")):
        with pytest.raises(UserError) as e:
            protocol.TurnRequest(**{"cid": 3, **bad})
        assert protocol.kind_of(e.value) is ErrorKind.BAD_REQUEST, bad
    with pytest.raises(ServingError, match="unknown option 'nope'"):
        protocol.parse_options(b'{"nope": 1}')
    # what float32 breaks, a seed of 5,000 digits, stop strings beyond their bounds
    for bad in (dict(sampling={"top_p": 5e-324}), dict(sampling={"temperature": 1, "repetition_penalty": 1e-300}),
                dict(sampling={"seed": 1 << 70}), dict(stop=["s"] * 17), dict(stop=["s" * 1025])):
        with pytest.raises(UserError) as e:
            protocol.TurnRequest(**{"cid": 3, "messages": "[]", **bad})
        assert protocol.kind_of(e.value) is ErrorKind.BAD_REQUEST, bad
    with pytest.raises(ServingError, match="not a valid UTF-8 JSON object"):
        protocol.parse_options(b'{"seed": ' + b"9" * 5000 + b"}")
    for kind in ErrorKind:
        assert protocol.decode_error(protocol.encode_error(ServingError("any words", kind))) == (kind, "any words")
    assert protocol.decode_error(protocol.encode_error(RuntimeError("bug")))[0] is ErrorKind.INTERNAL
    assert np.dtype(protocol.by_name(protocol.INPUTS)["SEED"].numpy) == np.int64


def test_conversation_ids_are_decimal_uint64_without_aliasing():
    assert protocol.conversation_id(123) == protocol.conversation_id("123") == 123
    assert protocol.conversation_id(str((1 << 64) - 1)) == (1 << 64) - 1
    for bad in ("0123", "0", "", "12a", "-5", "１２３", str(1 << 64), "9" * 5000, 0, -1, 1 << 64, True, 1.0, None):
        with pytest.raises(ServingError) as e:
            protocol.conversation_id(bad)
        assert protocol.kind_of(e.value) is ErrorKind.BAD_REQUEST, bad
