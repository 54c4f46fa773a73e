"""TensorRT-LLM export: checkpoints, sink-token engine builds, Triton repositories, parity emulation.

Nothing here imports ``tensorrt_llm``; the engine build runs ``trtllm-build`` in a subprocess when
a TensorRT-LLM that still has StreamingLLM (0.9 to 0.21) and a GPU are present.

>>> from streaming_trt.export import export_checkpoint, load_trtllm_checkpoint
>>> export_checkpoint("llama-hf", "llama-trtllm", dtype="float16", tp=2)      # doctest: +SKIP
>>> model = load_trtllm_checkpoint("llama-trtllm")   # any tp/pp, merged back  # doctest: +SKIP

See docs/export.md for the command line (``python -m streaming_trt.cli.build``) and the off-by-one
between the streaming contract and TensorRT-LLM's ``max_attention_window_size``.
"""
from __future__ import annotations

from .convert import Mapping, merge_trtllm_checkpoint, read_trtllm_checkpoint
from .emulate import TrtllmSinkEmulator, expected_agreement, hf_weights
from .engine import Toolchain, find_toolchain, supports_sinks
from .settings import SINK_VERSIONS, EngineOptions, SinkSettings, sink_settings, trtllm_build_command
from .support import SourceModel
from .inference_server import TritonOptions, write_triton_repo
from .trtllm import ExportPlan, ExportResult, export_checkpoint, load_trtllm_checkpoint, plan_export

# The user API. Everything else is an implementation detail of its submodule (import it from
# there: ``streaming_trt.export.settings.runtime_settings``); the command line is ``streaming_trt.cli.build``, the
# conversion ``export.trtllm``, the ONNX export the package ``export.onnx``.
__all__ = [
    "SINK_VERSIONS", "EngineOptions", "ExportPlan", "ExportResult", "Mapping", "SinkSettings", "SourceModel",
    "Toolchain", "TritonOptions", "TrtllmSinkEmulator", "expected_agreement", "export_checkpoint", "find_toolchain",
    "hf_weights", "load_trtllm_checkpoint", "merge_trtllm_checkpoint", "plan_export", "read_trtllm_checkpoint",
    "sink_settings", "supports_sinks", "trtllm_build_command", "write_triton_repo",
]
