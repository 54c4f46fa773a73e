"""A Triton Inference Server model repository for a sink-token engine (tensorrtllm_backend layout).

::

    REPO/
      ensemble/config.pbtxt          text_input, max_tokens -> text_output
                                     (preprocessing -> tensorrt_llm -> postprocessing)
      ensemble/1/
      preprocessing/config.pbtxt     Python backend, tokenizer_dir
      preprocessing/1/model.py
      tensorrt_llm/config.pbtxt      backend "tensorrtllm": gpt_model_path, gpt_model_type, sink_token_length,
                                     max_attention_window_size, enable_kv_cache_reuse false,
                                     enable_chunked_context false
      tensorrt_llm/1/
      postprocessing/config.pbtxt    Python backend, tokenizer_dir
      postprocessing/1/model.py

Every ``config.pbtxt`` is written filled in (no ``${...}`` placeholders left) and parsed back with
the ``ModelConfig`` protobuf that tritonclient ships before the repository is put in place.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from streaming_trt.contract import UserError

from .model_repository import write_model_repository
from .settings import SinkSettings

MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing")
BATCHING_STRATEGIES = ("inflight_fused_batching", "V1")


@dataclasses.dataclass(frozen=True)
class TritonOptions:
    engine_dir: str
    tokenizer_dir: str
    max_batch_size: int = 8
    max_input_len: int = 0  # preprocessing refuses longer prompts (0: no check)
    batching_strategy: str = "inflight_fused_batching"
    decoupled: bool = False  # True to stream tokens to the client (gRPC streaming)
    kv_cache_free_gpu_mem_fraction: float = 0.9
    max_queue_delay_microseconds: int = 0
    sink_token_id: int | None = None  # a sink-token model's token 0: preprocessing puts it first in every request


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False, reshape_scalar: bool = False,
            ragged: bool = False) -> str:
    lines = [f'    name: "{name}"', f"    data_type: {dtype}", f"    dims: [ {', '.join(map(str, dims))} ]"]
    if reshape_scalar:
        lines.append("    reshape: { shape: [ ] }")
    if ragged:
        lines.append("    allow_ragged_batch: true")
    if optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _tensors(kind: str, items: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _parameters(params: dict[str, object]) -> str:
    out = []
    for key, value in params.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        out.append(f'parameters: {{\n  key: "{key}"\n  value: {{\n    string_value: "{text}"\n  }}\n}}\n')
    return "".join(out)


def _header(name: str, backend: str | None, max_batch_size: int, platform: str | None = None) -> str:
    lines = [f"# Written by streaming-trt (python -m streaming_trt.cli.build --triton-repo).", f'name: "{name}"']
    if backend:
        lines.append(f'backend: "{backend}"')
    if platform:
        lines.append(f'platform: "{platform}"')
    lines.append(f"max_batch_size: {max_batch_size}")
    return "\n".join(lines) + "\n"


def tensorrt_llm_config(opts: TritonOptions, settings: SinkSettings) -> str:
    t = _tensor
    inputs = [
        t("input_ids", "TYPE_INT32", [-1], ragged=True),
        t("input_lengths", "TYPE_INT32", [1], reshape_scalar=True),
        t("request_output_len", "TYPE_INT32", [1], reshape_scalar=True),
        t("end_id", "TYPE_INT32", [1], optional=True, reshape_scalar=True),
        t("pad_id", "TYPE_INT32", [1], optional=True, reshape_scalar=True),
        t("beam_width", "TYPE_INT32", [1], optional=True, reshape_scalar=True),
        t("temperature", "TYPE_FP32", [1], optional=True, reshape_scalar=True),
        t("runtime_top_k", "TYPE_INT32", [1], optional=True, reshape_scalar=True),
        t("runtime_top_p", "TYPE_FP32", [1], optional=True, reshape_scalar=True),
        t("return_log_probs", "TYPE_BOOL", [1], optional=True, reshape_scalar=True),
        t("return_context_logits", "TYPE_BOOL", [1], optional=True, reshape_scalar=True),
        t("return_generation_logits", "TYPE_BOOL", [1], optional=True, reshape_scalar=True),
        t("streaming", "TYPE_BOOL", [1], optional=True, reshape_scalar=True),
        t("stop", "TYPE_BOOL", [1], optional=True, reshape_scalar=True),
    ]
    outputs = [
        t("output_ids", "TYPE_INT32", [-1, -1]),
        t("sequence_length", "TYPE_INT32", [-1]),
        t("cum_log_probs", "TYPE_FP32", [-1]),
        t("output_log_probs", "TYPE_FP32", [-1, -1]),
        t("context_logits", "TYPE_FP32", [-1, -1]),
        t("generation_logits", "TYPE_FP32", [-1, -1, -1]),
    ]
    params = {
        "gpt_model_path": opts.engine_dir,
        "gpt_model_type": opts.batching_strategy,
        "sink_token_length": settings.sink_token_length,
        "max_attention_window_size": settings.max_attention_window_size,
        "enable_kv_cache_reuse": False,
        "enable_chunked_context": False,
        "max_beam_width": 1,
        "batch_scheduler_policy": "guaranteed_no_evict",
        "kv_cache_free_gpu_mem_fraction": opts.kv_cache_free_gpu_mem_fraction,
        "exclude_input_in_output": True,
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "tokenizer_dir": opts.tokenizer_dir,
    }
    return (
        _header("tensorrt_llm", "tensorrtllm", opts.max_batch_size)
        + f"\nmodel_transaction_policy {{\n  decoupled: {'true' if opts.decoupled else 'false'}\n}}\n"
        + f"\ndynamic_batching {{\n  max_queue_delay_microseconds: {opts.max_queue_delay_microseconds}\n}}\n\n"
        + _tensors("input", inputs) + _tensors("output", outputs)
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
        + f"# Sinks: {settings.explain()}.\n"
        + _parameters(params)
    )


def preprocessing_config(opts: TritonOptions) -> str:
    t = _tensor
    inputs = [
        t("QUERY", "TYPE_STRING", [1]),
        t("REQUEST_OUTPUT_LEN", "TYPE_INT32", [1]),
        t("END_ID", "TYPE_INT32", [1], optional=True),
        t("PAD_ID", "TYPE_INT32", [1], optional=True),
    ]
    outputs = [
        t("INPUT_ID", "TYPE_INT32", [-1]),
        t("REQUEST_INPUT_LEN", "TYPE_INT32", [1]),
        t("REQUEST_OUTPUT_LEN", "TYPE_INT32", [1]),
        t("OUT_END_ID", "TYPE_INT32", [1]),
        t("OUT_PAD_ID", "TYPE_INT32", [1]),
    ]
    params = {"tokenizer_dir": opts.tokenizer_dir, "add_special_tokens": True, "max_input_len": opts.max_input_len,
              "sink_token_id": "" if opts.sink_token_id is None else opts.sink_token_id}
    return (_header("preprocessing", "python", opts.max_batch_size) + "\n" + _tensors("input", inputs)
            + _tensors("output", outputs) + _parameters(params)
            + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n")


def postprocessing_config(opts: TritonOptions) -> str:
    t = _tensor
    inputs = [t("TOKENS_BATCH", "TYPE_INT32", [-1, -1]), t("SEQUENCE_LENGTH", "TYPE_INT32", [-1])]
    outputs = [t("OUTPUT", "TYPE_STRING", [-1])]
    params = {"tokenizer_dir": opts.tokenizer_dir, "skip_special_tokens": True}
    return (_header("postprocessing", "python", opts.max_batch_size) + "\n" + _tensors("input", inputs)
            + _tensors("output", outputs) + _parameters(params)
            + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n")


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    maps = [f'      input_map {{\n        key: "{k}"\n        value: "{v}"\n      }}' for k, v in inputs.items()]
    maps += [f'      output_map {{\n        key: "{k}"\n        value: "{v}"\n      }}' for k, v in outputs.items()]
    return (f'    {{\n      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }")


def ensemble_config(opts: TritonOptions) -> str:
    t = _tensor
    inputs = [
        t("text_input", "TYPE_STRING", [1]),
        t("max_tokens", "TYPE_INT32", [1]),
        t("end_id", "TYPE_INT32", [1], optional=True),
        t("pad_id", "TYPE_INT32", [1], optional=True),
        t("temperature", "TYPE_FP32", [1], optional=True),
        t("top_k", "TYPE_INT32", [1], optional=True),
        t("top_p", "TYPE_FP32", [1], optional=True),
        t("stream", "TYPE_BOOL", [1], optional=True),
    ]
    outputs = [t("text_output", "TYPE_STRING", [-1])]
    steps = [
        _step("preprocessing",
              {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "END_ID": "end_id", "PAD_ID": "pad_id"},
              {"INPUT_ID": "_INPUT_ID", "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
               "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN", "OUT_END_ID": "_END_ID", "OUT_PAD_ID": "_PAD_ID"}),
        _step("tensorrt_llm",
              {"input_ids": "_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN",
               "request_output_len": "_REQUEST_OUTPUT_LEN", "end_id": "_END_ID", "pad_id": "_PAD_ID",
               "temperature": "temperature", "runtime_top_k": "top_k", "runtime_top_p": "top_p",
               "streaming": "stream"},
              {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"}),
        _step("postprocessing", {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
              {"OUTPUT": "text_output"}),
    ]
    return (_header("ensemble", None, opts.max_batch_size, platform="ensemble") + "\n"
            + _tensors("input", inputs) + _tensors("output", outputs)
            + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n")


def model_parameters(message) -> dict[str, str]:
    return {k: v.string_value for k, v in message.parameters.items()}


def render_repo(opts: TritonOptions, settings: SinkSettings) -> dict[str, str]:
    """Relative path -> file text, for every file of the repository."""
    here = Path(__file__).parent
    return {
        "ensemble/config.pbtxt": ensemble_config(opts),
        "preprocessing/config.pbtxt": preprocessing_config(opts),
        "preprocessing/1/model.py": (here / "inference_server_preprocess.py").read_text(),
        "tensorrt_llm/config.pbtxt": tensorrt_llm_config(opts, settings),
        "postprocessing/config.pbtxt": postprocessing_config(opts),
        "postprocessing/1/model.py": (here / "triton_postprocess.py").read_text(),
    }


def write_triton_repo(repo_dir: str | Path, opts: TritonOptions, settings: SinkSettings) -> Path:
    """Write the repository into the existing, empty directory ``repo_dir``; every config is parsed back."""
    if opts.batching_strategy not in BATCHING_STRATEGIES:
        raise UserError(f"batching strategy must be one of {BATCHING_STRATEGIES}, got {opts.batching_strategy!r}")
    if opts.max_batch_size < 1:
        raise UserError(f"max_batch_size must be >= 1, got {opts.max_batch_size}")
    files = render_repo(opts, settings)
    files.update({f"{model}/1/.keep": "" for model in ("ensemble", "tensorrt_llm")})
    return write_model_repository(repo_dir, files)
