"""Which Hugging Face checkpoints a TensorRT-LLM StreamingLLM (sink-token) engine runs exactly.

TensorRT-LLM's ``trtllm-build --streamingllm enable`` (0.9 to 0.21) asserts that the checkpoint's
architecture is ``LlamaForCausalLM``. A checkpoint of another family is exported under that name
only when it computes exactly what a Llama computes:

- Mistral: the same layers; accepted when ``sliding_window`` is null (a sliding window would be a
  second attention window that LlamaForCausalLM does not apply).
- Qwen2: q/k/v biases, no o_proj bias; accepted (``attn_bias`` with a zero dense bias is the same
  function) unless ``use_sliding_window`` is on.
- Qwen3: refused, its RMSNorm on q and k before RoPE has no Llama counterpart.

Rope scaling: ``default`` and ``linear`` only. In StreamingLLM generation TensorRT-LLM re-rotates
the cached keys with a separate kernel (``shiftKCache``) that applies the base frequency and the
linear scale but not a frequency table, while the query uses the scaled table (llama3); such keys
and queries would be rotated inconsistently.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from streaming_trt.runtime.config import ModelConfig
from streaming_trt.contract import CheckpointError, UnsupportedModelError

SINK_ROPE_TYPES = ("default", "linear")


@dataclasses.dataclass(frozen=True)
class SourceModel:
    """A Hugging Face checkpoint directory as the exporter sees it."""

    path: Path
    raw: dict  # config.json as written
    config: ModelConfig

    @property
    def architecture(self) -> str:
        archs = self.raw.get("architectures") or [f"{self.config.model_type}ForCausalLM"]
        return str(archs[0])


def read_source(model_dir: str | Path) -> SourceModel:
    """Parse ``config.json`` (tensors are read later); CheckpointError / UnsupportedModelError on bad input."""
    path = Path(model_dir)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory; pass a Hugging Face checkpoint directory with --model")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a Hugging Face checkpoint directory with --model")
    config = ModelConfig.from_dir(path)  # validates config.json, raises with the reason
    raw = json.loads((path / "config.json").read_text())
    return SourceModel(path=path, raw=raw, config=config)


def sink_engine_problems(source: SourceModel) -> list[str]:
    """Why a sink-token engine built from this checkpoint would not compute the same function."""
    c, raw = source.config, source.raw
    problems = []
    if c.model_type == "qwen3" or c.qk_norm:
        problems.append("it normalises q and k with RMSNorm (q_norm/k_norm) before RoPE, "
                        "which LlamaForCausalLM has no step for")
    if c.model_type == "mistral" and raw.get("sliding_window") is not None:
        problems.append(
            f"sliding_window={raw['sliding_window']} is a second attention window (Mistral sliding-window attention) "
            "that LlamaForCausalLM does not apply")
    if c.model_type == "qwen2" and raw.get("use_sliding_window"):
        problems.append(
            f"use_sliding_window is on (sliding_window={raw.get('sliding_window')}), a second attention window that "
            "LlamaForCausalLM does not apply")
    if c.mlp_bias:
        problems.append("it has MLP biases, which TensorRT-LLM's Llama checkpoint has no place for")
    if c.sink_logits:
        problems.append(f"sink_logits {c.sink_logits!r}: its softmax has an extra sink term (exp(s_h) in every "
                        "denominator), which TensorRT-LLM's Llama attention does not compute")
    kind = (c.rope_scaling or {}).get("rope_type", "default")
    if kind not in SINK_ROPE_TYPES:
        problems.append(
            f"rope scaling {kind!r}: in StreamingLLM generation TensorRT-LLM re-rotates cached keys (shiftKCache) "
            f"with the base frequency and a linear scale only, not the {kind} frequency table the query uses; "
            f"supported: {', '.join(SINK_ROPE_TYPES)}")
    return problems


def check_sink_engine(source: SourceModel) -> list[str]:
    """Raise UnsupportedModelError with the reasons, or return notes on how the model maps onto Llama."""
    problems = sink_engine_problems(source)
    if problems:
        arch = source.architecture
        head = f"{source.path}: cannot build a TensorRT-LLM sink-token engine from this {arch} checkpoint"
        if source.architecture == "LlamaForCausalLM":
            why = "the engine would not compute this model exactly: "
        else:
            why = "TensorRT-LLM's StreamingLLM build accepts LlamaForCausalLM only, and this model does not map " \
                  "exactly onto it: "
        raise UnsupportedModelError(f"{head}. {why}" + "; ".join(problems) + ".")
    notes = []
    if source.config.model_type != "llama":
        notes.append(f"{source.architecture} has the same layers as Llama here; exported as LlamaForCausalLM")
    if source.config.attention_bias and not source.config.o_proj_bias:
        notes.append("q/k/v biases without an o_proj bias: exported with attn_bias and a zero attention.dense.bias")
    return notes
