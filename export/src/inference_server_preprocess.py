"""Triton Python-backend model ``preprocessing``: text in, token ids out (written by streaming-trt).

Copied as ``preprocessing/1/model.py`` into a Triton model repository; it runs inside Triton
Inference Server, where ``triton_python_backend_utils`` exists. Parameters (config.pbtxt):
``tokenizer_dir``, ``add_special_tokens``, ``max_input_len``, ``sink_token_id`` (a model pre-trained with
a sink token: every request is a new stream of the engine, so the token goes first in each, once).
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"])
        self.add_special_tokens = params.get("add_special_tokens", "true").lower() in ("true", "1", "yes")
        self.max_input_len = int(params.get("max_input_len") or 0)
        sink = params.get("sink_token_id", "")
        self.sink = [int(sink)] if sink not in ("", None) else []
        eos = self.tokenizer.eos_token_id
        self.end_id = int(eos) if eos is not None else 0
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.end_id

    def _optional(self, request, name, default, batch):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return np.full((batch, 1), default, dtype=np.int32)
        return tensor.as_numpy().astype(np.int32).reshape(batch, 1)

    def execute(self, requests):
        responses = []
        for request in requests:
            query = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy().reshape(-1)
            ids = [self.sink + self.tokenizer.encode(_text(q), add_special_tokens=self.add_special_tokens) for q in query]
            too_long = [len(i) for i in ids if self.max_input_len and len(i) > self.max_input_len]
            if too_long:
                message = (f"prompt of {too_long[0]} tokens exceeds max_input_len={self.max_input_len} (the sink "
                           "engine matches the streaming contract only for prompts up to the cache capacity)")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
                continue
            batch, width = len(ids), max(1, max(len(i) for i in ids))
            input_ids = np.full((batch, width), self.pad_id, dtype=np.int32)
            for b, row in enumerate(ids):
                input_ids[b, : len(row)] = row
            lengths = np.array([[len(row)] for row in ids], dtype=np.int32)
            out_len = pb_utils.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN").as_numpy()
            tensors = [
                pb_utils.Tensor("INPUT_ID", input_ids),
                pb_utils.Tensor("REQUEST_INPUT_LEN", lengths),
                pb_utils.Tensor("REQUEST_OUTPUT_LEN", out_len.astype(np.int32).reshape(batch, 1)),
                pb_utils.Tensor("OUT_END_ID", self._optional(request, "END_ID", self.end_id, batch)),
                pb_utils.Tensor("OUT_PAD_ID", self._optional(request, "PAD_ID", self.pad_id, batch)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
