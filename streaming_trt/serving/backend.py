"""The Triton Python-backend model: ``TritonPythonModel`` for the repository's ``model.py``.

Runs inside Triton's Python backend stub (which provides ``triton_python_backend_utils``). Each
request is one turn of the conversation named by its sequence correlation id; replies stream
token by token (decoupled mode). Settings come from ``serve.json`` beside ``config.pbtxt``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from streaming_trt.cache import device_memory
from streaming_trt.catalog import open_model
from streaming_trt.cli import set_threads
from streaming_trt.contract import Geometry, UserError
from streaming_trt.recall import Recall
from streaming_trt.sampling import SamplingParams
from streaming_trt.serving.scheduler import Scheduler, TurnRequest
from streaming_trt.serving.store import ConversationStore

FLAG_START, FLAG_END = 1, 2
OPTIONAL = {"MAX_TOKENS": ("max_tokens", int), "TEMPERATURE": ("temperature", float), "TOP_K": ("top_k", int),
            "TOP_P": ("top_p", float), "SEED": ("seed", int), "RESUME": ("resume", bool)}


def _log(message: str) -> None:
    print(f"[streaming-trt backend] {message}", file=sys.stderr, flush=True)


class TritonPythonModel:
    """Hands every request to the :class:`~streaming_trt.serving.scheduler.Scheduler` and returns
    at once (decoupled mode): responses stream from the scheduler's threads, so Triton's queue never
    serialises turns and every conversation in flight advances in the same batched step."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # only inside Triton's backend stub

        self.pb = pb_utils
        settings = json.loads((Path(args["model_repository"]) / "serve.json").read_text())
        self.settings = settings
        t0 = time.perf_counter()
        set_threads(settings["threads"])
        model, tokenizer = open_model(settings["model"], settings["dtype"], settings["device"], settings["backend"],
                                      seed=settings["seed"], announce=False)
        store = ConversationStore(model, Geometry(settings["sink_tokens"], settings["window"]),
                                  settings["session_dir"], settings["host_memory"], settings.get("disk_budget"),
                                  settings.get("idle_ttl"), log=_log)
        self.scheduler = Scheduler(model, tokenizer, store, slots=pool_slots(settings, model),
                                   token_budget=settings["token_budget"], max_queue=settings["max_queue"],
                                   max_new_tokens=settings["max_new_tokens"],
                                   max_new_tokens_limit=settings["max_new_tokens_limit"],
                                   max_input_bytes=settings["max_input_bytes"],
                                   capture_decode=None if settings.get("cuda_graphs", True) else False,
                                   recall=Recall(**settings["recall"]) if settings.get("recall") else None)
        _log(f"model {settings['model'] or 'built-in'} loaded in {time.perf_counter() - t0:.1f} s; "
             f"{len(self.scheduler.rows)} slots ({self.scheduler.runner.nbytes() / 2**20:.1f} MiB of cache), "
             f"sessions in {settings['session_dir']}, pid {os.getpid()}")

    def _response(self, token: int, text: str, prompt_tokens: int = 0, seen: int = 0, finish: str = "",
                  logprob: float | None = None, top: list | None = None):
        pb = self.pb

        def out(name, values, dtype):
            return pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(torch.tensor(values, dtype=dtype)))

        def utf8(name, text):
            return out(name, list(text.encode("utf-8", "surrogatepass")), torch.uint8)

        return pb.InferenceResponse(output_tensors=[
            out("TOKEN_ID", [token], torch.int64),
            utf8("TEXT", text),
            out("PROMPT_TOKENS", [prompt_tokens], torch.int32),
            out("SEEN", [seen], torch.int64),
            utf8("FINISH", finish),
            out("LOGPROB", [float("nan") if logprob is None else logprob], torch.float32),
            utf8("TOP_LOGPROBS", "" if top is None else json.dumps(top)),
        ])

    def _request(self, request, sender):
        pb = self.pb
        messages = pb.get_input_tensor_by_name(request, "MESSAGES")
        if messages is None:
            raise_user("the MESSAGES input is missing")
        array = _numpy(messages)
        if array.dtype != np.uint8:
            raise_user("MESSAGES must be UINT8: the UTF-8 bytes of a JSON list of messages")
        flags = request.flags()
        kwargs = {"messages": array.tobytes(), "start": bool(flags & FLAG_START), "end": bool(flags & FLAG_END)}
        sampling = {"seed": 0}
        for name, (key, cast) in OPTIONAL.items():
            tensor = pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                values = _numpy(tensor)
                if values.size != 1:
                    raise_user(f"{name} must hold exactly one value, got {values.size}")
                (kwargs if key in ("max_tokens", "resume") else sampling)[key] = cast(values[0].item())
        options = pb.get_input_tensor_by_name(request, "OPTIONS")
        if options is not None:
            kwargs.update(turn_options(_numpy(options).tobytes(), sampling))
        cid = int(request.correlation_id())

        def on_token(event):
            sender.send(self._response(event.token, event.text, logprob=event.logprob, top=event.top))

        def on_done(result, error):
            if error is None:
                final = self._response(-1, result.text, result.prompt_tokens, result.seen, result.finish_reason)
            else:
                if not isinstance(error, UserError):
                    _log(f"conversation {cid}: {error}")
                final = pb.InferenceResponse(error=pb.TritonError(str(error)))
            sender.send(final, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        return TurnRequest(cid, sampling=SamplingParams(**sampling), on_token=on_token, on_done=on_done,
                           cancelled=sender.is_cancelled, **kwargs)

    def execute(self, requests):
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.scheduler.submit(self._request(request, sender))
            except UserError as e:  # bad input, or every slot and the queue are full: refused at once
                try:
                    sender.send(pb.InferenceResponse(error=pb.TritonError(str(e))),
                                flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception as sent:  # the client cancelled: nobody to tell
                    _log(f"error response not delivered ({type(sent).__name__}: {sent})")
        return None

    def finalize(self):
        _log("stopping")
        self.scheduler.close()


def pool_slots(settings: dict, model) -> int:
    """``slots``, or as many conversations as ``slot_memory`` bytes hold (default: a quarter of the
    device's free memory), at most 64 and at least 1."""
    if settings.get("slots"):
        return settings["slots"]
    c = model.config
    per = Geometry(settings["sink_tokens"], settings["window"]).cache_bytes(c.num_layers, 1, c.num_kv_heads,
                                                                            c.head_dim, model.dtype)
    budget = settings.get("slot_memory") or device_memory(model.device) // 4
    if budget < per:
        raise UserError(f"slot_memory of {budget} bytes holds no conversation: one needs {per} bytes")
    return max(1, min(64, budget // per))


def turn_options(raw: bytes, sampling: dict) -> dict:
    """The OPTIONS input (UTF-8 JSON object): SamplingParams fields by name go into ``sampling``;
    returns the turn's ``stop``, ``logprobs`` and ``raw``. An unknown key is refused by name."""
    try:
        options = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise_user(f"OPTIONS is not a valid UTF-8 JSON object ({e})")
    if not isinstance(options, dict):
        raise_user("OPTIONS must be a JSON object")
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    turn = {}
    for key, value in options.items():
        if key in fields:
            sampling[key] = value
        elif key == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise_user("OPTIONS stop must be a string or a list of strings")
            turn["stop"] = tuple(s for s in value if s)
        elif key == "raw":
            if not isinstance(value, bool):
                raise_user("OPTIONS raw must be true or false")
            turn["raw"] = value
        elif key == "logprobs":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20):
                raise_user("OPTIONS logprobs must be an integer in [0, 20] (top alternatives per token) or null")
            turn["logprobs"] = value
        else:
            raise_user(f"OPTIONS has an unknown option {key!r}; known: {sorted(fields | {'stop', 'logprobs', 'raw'})}")
    return turn


def _numpy(tensor) -> np.ndarray:
    """A request tensor as a flat numpy array, through DLPack: the stub's ``as_numpy`` returns
    wrong strides under numpy 2 (it was built against numpy 1)."""

    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).reshape(-1).numpy()


def raise_user(message: str):
    raise UserError(message)
