"""The Triton Python-backend model: ``TritonPythonModel`` for the repository's ``model.py``.

Runs inside Triton's Python backend stub (which provides ``triton_python_backend_utils``). Each
request is one turn of the conversation named by its sequence correlation id; replies stream
token by token (decoupled mode). Settings come from ``serve.json`` beside ``config.pbtxt``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

FLAG_START, FLAG_END = 1, 2
OPTIONAL = {"MAX_TOKENS": ("max_tokens", int), "TEMPERATURE": ("temperature", float), "TOP_K": ("top_k", int),
            "TOP_P": ("top_p", float), "SEED": ("seed", int), "RESUME": ("resume", bool)}


def _log(message: str) -> None:
    print(f"[streaming-trt backend] {message}", file=sys.stderr, flush=True)


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        settings = json.loads((Path(args["model_repository"]) / "serve.json").read_text())
        self.settings = settings
        from argparse import Namespace

        from streaming_trt import cli
        from streaming_trt.serving.engine import Engine
        from streaming_trt.serving.store import ConversationStore

        t0 = time.perf_counter()
        model, tokenizer = cli.load(Namespace(model=settings["model"], dtype=settings["dtype"],
                                              device=settings["device"], backend=settings["backend"],
                                              seed=settings["seed"], threads=settings["threads"]))
        store = ConversationStore(model, settings["sink_tokens"], settings["window"], settings["session_dir"],
                                  settings["max_resident"])
        self.engine = Engine(model, tokenizer, store, max_new_tokens=settings["max_new_tokens"],
                             max_new_tokens_limit=settings["max_new_tokens_limit"],
                             max_input_bytes=settings["max_input_bytes"])
        _log(f"model {settings['model'] or 'built-in'} loaded in {time.perf_counter() - t0:.1f} s; "
             f"sessions in {settings['session_dir']} (max {settings['max_resident']} resident), pid {os.getpid()}")

    def _response(self, token: int, text: str, prompt_tokens: int = 0, seen: int = 0, finish: str = ""):
        import torch

        pb = self.pb

        def out(name, values, dtype):
            return pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(torch.tensor(values, dtype=dtype)))

        return pb.InferenceResponse(output_tensors=[
            out("TOKEN_ID", [token], torch.int64),
            out("TEXT", list(text.encode("utf-8")), torch.uint8),
            out("PROMPT_TOKENS", [prompt_tokens], torch.int32),
            out("SEEN", [seen], torch.int64),
            out("FINISH", list(finish.encode("utf-8")), torch.uint8),
        ])

    def _kwargs(self, request) -> dict:
        pb = self.pb
        messages = pb.get_input_tensor_by_name(request, "MESSAGES")
        if messages is None:
            raise_user("the MESSAGES input is missing")
        array = _numpy(messages)
        if array.dtype != np.uint8:
            raise_user("MESSAGES must be UINT8: the UTF-8 bytes of a JSON list of messages")
        kwargs = {"messages": array.tobytes()}
        for name, (key, cast) in OPTIONAL.items():
            tensor = pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                values = _numpy(tensor)
                if values.size != 1:
                    raise_user(f"{name} must hold exactly one value, got {values.size}")
                kwargs[key] = cast(values[0].item())
        flags = request.flags()
        kwargs["start"], kwargs["end"] = bool(flags & FLAG_START), bool(flags & FLAG_END)
        return kwargs

    def execute(self, requests):
        from streaming_trt.errors import UserError

        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            cid = int(request.correlation_id())
            try:
                kwargs = self._kwargs(request)
                loads = self.engine.store.loads
                result = self.engine.turn(cid, emit=lambda token, piece: sender.send(self._response(token, piece)),
                                          cancelled=sender.is_cancelled, **kwargs)
                if self.engine.store.loads > loads:
                    _log(f"conversation {cid} restored from {self.engine.store.path(cid)}")
                final = self._response(-1, "", result.prompt_tokens, result.seen, result.finish_reason)
            except UserError as e:
                final = pb.InferenceResponse(error=pb.TritonError(str(e)))
            except Exception as e:  # a bug, or a client gone mid-send: report it, serve the others
                _log(f"conversation {cid}: {type(e).__name__}: {e}")
                final = pb.InferenceResponse(error=pb.TritonError(f"internal error: {type(e).__name__}: {e}"))
            try:
                sender.send(final, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as e:  # the client cancelled: nobody to tell
                _log(f"conversation {cid}: final response not delivered ({type(e).__name__}: {e})")
        return None

    def finalize(self):
        _log("stopping")


def _numpy(tensor) -> np.ndarray:
    """A request tensor as a flat numpy array, through DLPack: the stub's ``as_numpy`` returns
    wrong strides under numpy 2 (it was built against numpy 1)."""
    import torch

    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).reshape(-1).numpy()


def raise_user(message: str):
    from streaming_trt.errors import UserError

    raise UserError(message)
