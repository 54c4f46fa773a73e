"""Triton Python-backend model ``postprocessing``: token ids in, text out (written by streaming-trt).

Copied as ``postprocessing/1/model.py`` into a Triton model repository; it runs inside Triton
Inference Server. Parameters (config.pbtxt): ``tokenizer_dir``, ``skip_special_tokens``.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"])
        self.skip_special_tokens = params.get("skip_special_tokens", "true").lower() in ("true", "1", "yes")

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()  # [batch, beams, seq]
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()  # [batch, beams]
            if tokens.ndim == 2:  # a single request without its batch dimension
                tokens, lengths = tokens[None], lengths.reshape(1, -1)
            texts = [
                [self.tokenizer.decode(tokens[b, k, : int(lengths[b, k])].tolist(),
                                       skip_special_tokens=self.skip_special_tokens).encode("utf-8")
                 for k in range(tokens.shape[1])]
                for b in range(tokens.shape[0])
            ]
            output = pb_utils.Tensor("OUTPUT", np.array(texts, dtype=object))
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
