"""A worker behind NVIDIA Dynamo's frontend: ``python -m streaming_trt.cli.serve --dynamo``.

``python -m dynamo.frontend`` renders the chat template, tokenizes, routes and speaks the OpenAI
API; this worker registers a ``ModelInput.Tokens`` model (Chat and Completions) and runs every
request on the project's :class:`~streaming_trt.serving.scheduler.Scheduler` (continuous batching,
recall, sampling controls, stop strings, logprobs). The ``dynamo`` package is imported lazily: the
``[dynamo]`` extra installs it (docs/serving.md).

A conversation is the request's session id (``agent_context.session_id``, the frontend's
``X-Dynamo-Session-ID`` header; the router pins it to one worker). The frontend sends the whole
history's token ids every turn; the worker keeps a :class:`History` of what the saved state holds
(the last prompt's length and digest, the reply's text, every id fed) and feeds only the new
tokens when the request extends it. Any other history (edited, truncated, regenerated) starts a
fresh state from the whole history. A request without a session id is one-shot: nothing is kept.

Each History is a small file beside the session's state file (``<id>.dynamo``, deleted with it when
the conversation is ended, replaced or reaped), written after the turn's state is saved, so the
worker that takes a session over after a failover knows what was fed; when its store holds no
current state for the session it re-feeds the ids the history records (the same tokens, so the
same state: chunks change nothing, docs/contract.md).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models

from ..contract import UserError
from ..loading.builtin import BuiltinTokenizer
from ..runtime.sampling import SamplingParams
from .conversations import session_conversation
from .journal import session_path
from .protocol import MAX_LOGPROBS, ErrorKind, ServingError, TurnRequest, kind_of
from .settings import build_scheduler

HISTORY_SUFFIX = ".dynamo"  # one of the store's sidecars


def history_path(session_dir, cid: int) -> Path:
    """Where session ``cid``'s history record lives in ``session_dir`` (tests and benchmarks read it)."""
    return session_path(session_dir, cid).with_suffix(HISTORY_SUFFIX)
NAMESPACE, COMPONENT, ENDPOINT = "streaming_trt", "worker", "generate"
# The frontend refuses a prompt longer than the registered context length ("This model's maximum
# context length is ..."). A StreamingLLM conversation has no such bound: its history may grow past
# the model's max_position_embeddings by design. Register the largest value the card holds (u32).
CONTEXT_LENGTH = 2**32 - 1
# What the frontend may send that this worker maps onto SamplingParams (None or absent: the default).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "frequency_penalty",
                 "presence_penalty")


def _log(message: str) -> None:
    print(f"[streaming-trt dynamo] {message}", file=sys.stderr, flush=True)


def _digest(ids) -> str:
    return hashlib.sha256(array("q", ids).tobytes()).hexdigest()


@dataclasses.dataclass
class History:
    """What the saved state of a session holds, as the frontend renders it.

    ``prompt_len`` / ``prompt_digest``: the last request's token ids (the history up to that turn's
    reply); ``reply_text``: the reply the frontend showed; ``fed``: every id the state was fed, in
    order (the reply as generated, not as re-tokenized); ``seen``: the stream's length after the
    turn; ``turns``; ``fresh``: turns that started a fresh state (the first, an edited history, a
    failover); ``writer``: the worker that wrote it (host:pid).
    """

    prompt_len: int
    prompt_digest: str
    reply_text: str
    fed: list[int]
    seen: int
    turns: int
    fresh: int
    writer: str


class Histories:
    """Session histories in ``store``'s ``<id>.dynamo`` sidecar files (atomic rename)."""

    def __init__(self, store, tokenizer, end_of_reply: list[int]):
        self.store = store
        self.tokenizer, self.end_of_reply = tokenizer, list(end_of_reply)
        self.writer = f"{socket.gethostname()}:{os.getpid()}"

    def path(self, cid: int) -> Path:
        return self.store.sidecar(cid, HISTORY_SUFFIX)

    def load(self, cid: int) -> History | None:
        try:
            return History(**json.loads(self.path(cid).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:  # unreadable: the session starts fresh from the whole history
            _log(f"session {cid}: ignoring unreadable history {self.path(cid)} ({e})")
            return None

    def save(self, cid: int, history: History) -> None:
        path = self.path(cid)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(history), f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def text(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def new_ids(self, history: History, token_ids: list[int]) -> list[int] | None:
        """The ids ``token_ids`` adds to ``history``: it must hold the last prompt, then the reply
        (as text: the frontend re-tokenizes it), then the template's end of a reply, then at least
        one more id. None when it does not extend it."""
        n, end = history.prompt_len, self.end_of_reply
        if len(token_ids) <= n or _digest(token_ids[:n]) != history.prompt_digest:
            return None
        rest = token_ids[n:]
        for k in range(len(rest) - len(end)):
            if rest[k : k + len(end)] == end and self.text(rest[:k]) == history.reply_text:
                return rest[k + len(end):] or None
        return None


@dataclasses.dataclass
class Plan:
    """How one turn runs: ``ids`` fed on a ``fresh`` state or continuing the saved one; ``base``:
    the ids the state holds before them (the new History's ``fed`` starts with them)."""

    cid: int | None
    ids: list[int]
    fresh: bool
    base: list[int]
    turns: int = 0
    fresh_turns: int = 0


class DynamoWorker:
    """Runs the frontend's requests on ``scheduler`` (see the module docstring)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.tokenizer = scheduler.tokenizer
        end = scheduler.encoder._encode(scheduler.encoder.end_of_reply)
        self.histories = Histories(scheduler.store, self.tokenizer, end)
        self.locks: dict[int, list] = {}  # session -> [asyncio.Lock, requests holding or awaiting it]
        self.served = False

    # ----------------------------------------------------------------- the request
    @staticmethod
    def sampling(request: dict) -> tuple[SamplingParams, int | None, tuple[str, ...], int | None]:
        """The frontend's ``sampling_options`` / ``stop_conditions`` / ``output_options`` ->
        (SamplingParams, max_tokens, stop strings, logprobs); UserError saying what to change."""
        opts = request.get("sampling_options") or {}
        fields = {k: opts[k] for k in SAMPLING_KEYS if opts.get(k) is not None}
        if fields.get("top_k") == -1:  # the OpenAI convention for "off"
            fields["top_k"] = 0
        for key in ("n", "best_of"):
            if opts.get(key) not in (None, 1):
                raise UserError(f"{key} must be 1: this server returns one choice per request")
        if opts.get("guided_decoding"):
            raise UserError("guided decoding (response_format, tools) is not supported by this server")
        params = SamplingParams(**fields)
        stop = request.get("stop_conditions") or {}
        if stop.get("min_tokens") not in (None, 0):
            raise UserError("min_tokens is not supported by this server")
        if stop.get("ignore_eos"):
            raise UserError("ignore_eos is not supported by this server")
        strings = stop.get("stop") or ()
        out = request.get("output_options") or {}
        if out.get("prompt_logprobs") is not None:
            raise UserError("prompt_logprobs is not supported by this server")
        logprobs = out.get("logprobs")
        if logprobs is not None and not (type(logprobs) is int and 0 <= logprobs <= MAX_LOGPROBS):
            raise UserError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}]")
        return params, stop.get("max_tokens"), tuple(strings), logprobs

    def plan(self, session_id: str | None, token_ids: list[int]) -> Plan:
        """What to feed: only the new ids when the session's saved state holds the request's history,
        else the whole history on a fresh state (the ids recorded for the part it shares)."""
        if not session_id:
            return Plan(None, token_ids, True, [])
        cid = session_conversation(session_id)
        history = self.histories.load(cid)  # the newest, whoever wrote it
        new = None if history is None else self.histories.new_ids(history, token_ids)
        if new is None:
            return Plan(cid, token_ids, True, [])
        if self._store_holds(cid, history.seen):  # the saved state is the one the history describes, whoever
            return Plan(cid, new, False, history.fed, history.turns, history.fresh)  # wrote it (a failover too)
        # The state was lost or is not the one the history describes (its worker died between saving
        # the one and writing the other): the same ids again, on a fresh state.
        return Plan(cid, history.fed + new, True, [], history.turns, history.fresh)

    def _store_holds(self, cid: int, seen: int) -> bool:
        """The one use of the ConversationStore here: does it hold session ``cid``'s state after
        ``seen`` tokens (what the History on disk records)?"""
        store = self.scheduler.store
        try:
            return store.exists(cid) and store.seen(cid) == seen
        except Exception:  # an unreadable or vanished file: start fresh
            return False

    # ----------------------------------------------------------------- serving
    async def generate(self, request: dict, context=None):
        """The endpoint's handler: yields the frontend's chunks (``token_ids``, then ``finish_reason``)."""
        try:
            token_ids = [int(t) for t in request.get("token_ids") or []]
            if not token_ids:
                raise UserError("the request has no token ids")
            params, max_tokens, stop, logprobs = self.sampling(request)
        except (UserError, ValueError, TypeError) as e:
            raise _http_error(ServingError(str(e), ErrorKind.BAD_REQUEST)) from None
        session_id = (request.get("agent_context") or {}).get("session_id")
        cid = session_conversation(session_id) if session_id else None
        if cid is not None:  # one turn of a session at a time: each plans on the last one's history
            entry = self.locks.setdefault(cid, [asyncio.Lock(), 0])
            entry[1] += 1
            await entry[0].acquire()
        try:
            async for chunk in self._turn(session_id, token_ids, params, max_tokens, stop, logprobs, context):
                yield chunk
        finally:
            if cid is not None:
                entry[0].release()
                entry[1] -= 1
                if entry[1] == 0:
                    del self.locks[cid]

    async def _turn(self, session_id, token_ids, params, max_tokens, stop, logprobs, context):
        plan = self.plan(session_id, token_ids)
        if not self.served:
            self.served = True
            _log("first request received from the frontend")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def cancelled() -> bool:
            return gone.is_set() or (context is not None and context.is_stopped())

        # A one-shot request runs as a conversation of its own, ended with its turn (nothing is saved).
        cid = plan.cid if plan.cid is not None else 1 + int.from_bytes(os.urandom(8), "little") % ((1 << 64) - 1)
        try:
            req = TurnRequest(cid, [], start=plan.fresh, end=plan.cid is None, max_tokens=max_tokens,
                              sampling=params, stop=stop, logprobs=logprobs, token_ids=plan.ids,
                              on_token=lambda e: loop.call_soon_threadsafe(events.put_nowait, ("token", e)),
                              on_done=lambda r, e: loop.call_soon_threadsafe(events.put_nowait, ("done", (r, e))),
                              cancelled=cancelled)
            self.scheduler.submit(req)
        except Exception as e:
            raise _http_error(e) from None
        visible: list[int] = []
        try:
            while True:
                kind, value = await events.get()
                if kind == "token":
                    if value.token < 0:  # held-back text only: the frontend detokenizes ids itself
                        continue
                    visible.append(value.token)
                    chunk = {"token_ids": [value.token], "index": 0}
                    if logprobs is not None:
                        chunk["log_probs"] = [value.logprob]
                        if value.top:
                            chunk["top_logprobs"] = [[{"rank": r + 1, "token_id": i, "token": t, "logprob": lp}
                                                      for r, (i, t, lp) in enumerate(value.top)]]
                    yield chunk
                    continue
                result, error = value
                if error is not None:
                    raise _http_error(error)
                if plan.cid is not None and result.finish_reason != "cancelled":
                    history = History(len(token_ids), _digest(token_ids), self.histories.text(visible),
                                      plan.base + plan.ids + list(result.reply_ids), result.seen, plan.turns + 1,
                                      plan.fresh_turns + plan.fresh, self.histories.writer)
                    await asyncio.to_thread(self.histories.save, plan.cid, history)
                finish = {"stop": "stop", "length": "length"}.get(result.finish_reason, "cancelled")
                yield {"token_ids": [], "index": 0, "finish_reason": finish,
                       "completion_usage": {"prompt_tokens": len(token_ids), "completion_tokens": result.completion_tokens,
                                            "total_tokens": len(token_ids) + result.completion_tokens}}
                return
        finally:
            gone.set()  # the client left (or the turn is over): the scheduler ends the turn


def _http_error(error: Exception) -> Exception:
    """The exception the frontend turns into the client's error. Dynamo 1.6.1's frontend passes the
    message of an ``InvalidArgument`` on (400) but answers a worker's ``HttpError`` with its bare
    status ("Bad Request"), so a bad request raises InvalidArgument."""
    from dynamo.llm import HttpError  # the [dynamo] extra, optional
    from dynamo.llm.exceptions import EngineShutdown, InvalidArgument

    kind = kind_of(error)
    if kind is ErrorKind.BAD_REQUEST:
        return InvalidArgument(str(error))
    if kind is ErrorKind.SHUTTING_DOWN:
        return EngineShutdown(str(error))
    if kind is ErrorKind.BUSY:
        return HttpError(429, str(error))
    _log(f"internal error: {error}")
    return HttpError(500, str(error))


# --------------------------------------------------------------------------- the model directory
def model_dir(config, tokenizer, source: str | None, name: str) -> Path:
    """The frontend's model directory, at one path for every worker of the same files
    (``$TMPDIR/streaming-trt-dynamo/<name>-<digest>``): the frontend refuses a worker whose model
    card differs from the first one's, and the card holds the files' paths."""

    base = Path(tempfile.gettempdir()) / "streaming-trt-dynamo"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=base))
    write_model_dir(tmp, config, tokenizer, source)
    digest = hashlib.sha256()
    for path in sorted(tmp.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    out = base / f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)}-{digest.hexdigest()[:16]}"
    try:
        tmp.rename(out)
    except OSError:  # another worker of the same model wrote it first: the same files
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_model_dir(out: Path, config, tokenizer, source: str | None) -> Path:
    """A directory the frontend reads (config.json, tokenizer.json, tokenizer_config.json with the
    chat template), rendering and tokenizing as the project's tokenizer does. ``config``: the
    model's :class:`~streaming_trt.runtime.config.ModelConfig`; ``source``: the model's name or path."""

    out.mkdir(parents=True, exist_ok=True)
    c = config
    config = {"architectures": ["LlamaForCausalLM"], "model_type": c.model_type, "vocab_size": c.vocab_size,
              "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
              "num_key_value_heads": c.num_kv_heads, "max_position_embeddings": c.max_position_embeddings,
              "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}
    if source and Path(source).is_dir() and (Path(source) / "config.json").is_file():
        config = json.loads((Path(source) / "config.json").read_text())
    if isinstance(tokenizer, BuiltinTokenizer):
        _builtin_tokenizer_files(out, tokenizer)
    else:
        tokenizer.save_pretrained(str(out))
        template = getattr(tokenizer, "chat_template", None)
        if not (out / "tokenizer.json").is_file() or not template:
            raise UserError(f"{source}: the frontend needs a fast tokenizer (tokenizer.json) with a chat template")
        conf_path = out / "tokenizer_config.json"
        conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
        conf["chat_template"] = template  # transformers 5 writes it to chat_template.jinja; the frontend reads it here
        conf_path.write_text(json.dumps(conf, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def _builtin_tokenizer_files(out: Path, tok) -> None:
    """tokenizer.json (one token per character, the specials as special added tokens) and the
    built-in chat template, for the random test model's character tokenizer."""

    vocab = {s: i for i, s in enumerate(tok.specials)}
    vocab.update({ch: i + len(tok.specials) for i, ch in enumerate(tok.chars)})
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    t.decoder = decoders.Fuse()

    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.specials])
    t.save(str(out / "tokenizer.json"))
    template = ("<s>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": CONTEXT_LENGTH}, indent=1))


# --------------------------------------------------------------------------- the process
def run(conf: dict, served_model_name: str, namespace: str = NAMESPACE, affinity_ttl: int = 600) -> int:
    """Serve until SIGINT / SIGTERM (``python -m streaming_trt.cli.serve --dynamo``). ``conf``: serve's
    settings; discovery and request plane come from ``DYN_DISCOVERY_BACKEND`` / ``DYN_FILE_KV`` /
    ``DYN_REQUEST_PLANE``."""
    try:
        import dynamo.llm  # noqa: F401
        from dynamo.runtime import DistributedRuntime  # the [dynamo] extra, optional
    except ImportError as e:
        raise UserError(f"--dynamo needs NVIDIA Dynamo ({e}): pip install 'streaming-trt[dynamo]' and "
                        "pip install --no-deps ai-dynamo==1.6.1 (docs/serving.md)") from None

    t0 = time.perf_counter()
    scheduler = build_scheduler(conf, _log)
    files = model_dir(scheduler.runner.model.config, scheduler.tokenizer, conf["model"], served_model_name)
    worker = DynamoWorker(scheduler)
    _log(f"model {conf['model'] or 'built-in'} loaded in {time.perf_counter() - t0:.1f} s; "
         f"{len(scheduler.rows)} slots; sessions in {conf['session_dir']}; frontend files in {files}")

    async def main() -> None:

        from dynamo.llm import ModelInput, ModelRuntimeConfig, ModelType, RouterConfig, RouterMode, WorkerType, register_model  # the [dynamo] extra, optional

        loop = asyncio.get_running_loop()
        runtime = DistributedRuntime(loop, os.environ.get("DYN_DISCOVERY_BACKEND", "etcd"),
                                     os.environ.get("DYN_REQUEST_PLANE", "tcp"))
        endpoint = runtime.endpoint(f"{namespace}.{COMPONENT}.{ENDPOINT}")
        runtime_config = ModelRuntimeConfig()
        runtime_config.context_length = CONTEXT_LENGTH
        runtime_config.max_num_seqs = len(scheduler.rows)
        await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, endpoint, str(files),
                             served_model_name, worker_type=WorkerType.Aggregated, runtime_config=runtime_config,
                             router_config=RouterConfig(RouterMode.RoundRobin, session_affinity_ttl_secs=affinity_ttl))
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        serving = asyncio.ensure_future(endpoint.serve_endpoint(worker.generate))
        print(f"[streaming-trt] ready: Dynamo worker {namespace}.{COMPONENT}.{ENDPOINT} serving "
              f"{served_model_name!r}, pid {os.getpid()}; sessions in {conf['session_dir']}", flush=True)
        await asyncio.wait([serving, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        runtime.shutdown()

    try:
        asyncio.run(main())
    finally:
        scheduler.close()
    _log("stopped")
    return 0
