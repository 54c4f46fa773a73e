"""The Triton Python-backend model: ``TritonPythonModel`` for the repository's ``model.py``.

Runs inside Triton's Python backend stub (which provides ``triton_python_backend_utils``). Each
request is one turn of the conversation named by its sequence correlation id; replies stream
token by token (decoupled mode). Settings come from ``serve.json`` beside ``config.pbtxt``.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from streaming_trt.serving import protocol
from streaming_trt.serving.settings import build_scheduler


def _log(message: str) -> None:
    print(f"[streaming-trt backend] {message}", file=sys.stderr, flush=True)


class TritonPythonModel:
    """Hands every request to the :class:`~streaming_trt.serving.scheduler.Scheduler` and returns
    at once (decoupled mode): responses stream from the scheduler's threads, so Triton's queue never
    serialises turns and every conversation in flight advances in the same batched step."""

    slots_to_free: queue.SimpleQueue | None = None  # conversation ids whose Triton sequence to END

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # only inside Triton's backend stub

        self.pb = pb_utils
        settings = json.loads((Path(args["model_repository"]) / "serve.json").read_text())
        self.settings = settings
        t0 = time.perf_counter()
        self.scheduler = build_scheduler(settings, _log)
        if settings.get("grpc_url"):  # written by serve.py; a repository served by hand has none
            self.slots_to_free = queue.SimpleQueue()
            threading.Thread(target=self._free_slots, name="streaming-trt-slot-freer", daemon=True).start()
        _log(f"model {settings['model'] or 'built-in'} loaded in {time.perf_counter() - t0:.1f} s; "
             f"{len(self.scheduler.rows)} slots ({self.scheduler.runner.nbytes() / 2**20:.1f} MiB of cache), "
             f"sessions in {settings['session_dir']}, pid {os.getpid()}")

    def _response(self, item):
        """A response carrying ``item`` (a TokenEvent or a TurnResult) in every output of the protocol."""
        pb, values = self.pb, protocol.response_outputs(item)
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor.from_dlpack(t.name, torch.utils.dlpack.to_dlpack(
                torch.tensor(values[t.name], dtype=getattr(torch, t.numpy)))) for t in protocol.OUTPUTS])

    def _error(self, cid, error: BaseException):
        if protocol.kind_of(error) is protocol.ErrorKind.INTERNAL:
            _log(f"conversation {cid}: {error}")
        return self.pb.InferenceResponse(error=self.pb.TritonError(protocol.encode_error(error)))

    def _request(self, request, sender) -> protocol.TurnRequest:
        pb = self.pb
        cid = protocol.conversation_id(request.correlation_id())

        def read(name):
            tensor = pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else _numpy(tensor)

        def on_token(event):
            sender.send(self._response(event))

        start = bool(request.flags() & protocol.FLAG_START)

        def on_done(result, error):
            final = self._response(result) if error is None else self._error(cid, error)
            try:
                sender.send(final, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            finally:
                if error is not None and start:
                    self.free_slot(cid)

        return protocol.decode_request(read, request.flags(), cid, self.settings["max_input_bytes"],
                                       on_token=on_token, on_done=on_done, cancelled=sender.is_cancelled)

    def execute(self, requests):
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            try:
                turn = self._request(request, sender)
                if turn.free_slot:  # Triton frees the slot once this END request is answered
                    turn.on_done(protocol.TurnResult(0, 0, "ended", 0), None)
                    continue
                self.scheduler.submit(turn)
            except Exception as e:  # bad input, or every slot and the queue are full: refused at once
                try:
                    sender.send(self._error(request.correlation_id(), e),
                                flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception as sent:  # the client cancelled: nobody to tell
                    _log(f"error response not delivered ({type(sent).__name__}: {sent})")
                if request.flags() & protocol.FLAG_START:
                    self.free_slot(request.correlation_id())
        return None

    def free_slot(self, cid) -> None:
        """A START that ends in an error (refused, or failed before it ran) would hold its Triton
        sequence slot for ``--sequence-idle-seconds``: END it (OPTIONS ``free_slot``), from a thread
        of its own (the END comes back through :meth:`execute`)."""
        if self.slots_to_free is not None and self.slots_to_free.qsize() < 4096:  # beyond, a flood of refusals: the idle time frees them
            self.slots_to_free.put(cid)

    def _free_slots(self) -> None:
        from streaming_trt.serving.client import Client, ServerError

        client = Client(self.settings["grpc_url"], timeout=30.0, api_key=self.settings.get("api_key"))
        while True:
            cid = self.slots_to_free.get()
            if cid is None:
                return
            if isinstance(cid, str):  # a string sequence id: the Client sends integer ones only
                continue
            try:
                for _ in client.turn(cid, [], end=True, options={"free_slot": True}):
                    pass
            except ServerError:  # freed already (idle, or a later END)
                continue
            except Exception as e:  # noqa: BLE001 - this thread must outlive any one failure
                _log(f"sequence slot of {cid} not freed ({type(e).__name__}: {e})")

    def finalize(self):
        _log("stopping")
        if self.slots_to_free is not None:
            self.slots_to_free.put(None)
        self.scheduler.close()


def _numpy(tensor) -> np.ndarray:
    """A request tensor as a flat numpy array, through DLPack: the stub's ``as_numpy`` returns
    wrong strides under numpy 2 (it was built against numpy 1)."""

    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).reshape(-1).numpy()
