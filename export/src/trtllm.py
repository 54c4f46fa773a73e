"""A Hugging Face checkpoint to a TensorRT-LLM checkpoint: the checks (:func:`plan_export`), the
conversion (:func:`export_checkpoint`) and the way back to the eager runtime (:func:`load_trtllm_checkpoint`)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from streaming_trt.loading.checkpoint import load_checkpoint
from streaming_trt.contract import UserError
from streaming_trt.runtime.model import Transformer

from .convert import DTYPES, Mapping, check_mapping, merge_trtllm_checkpoint, write_trtllm_checkpoint
from .files import atomic_dir
from .support import SourceModel, check_sink_engine, read_source


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    dtype: str
    mapping: Mapping
    notes: list[str]  # how a non-Llama checkpoint was mapped onto LlamaForCausalLM


def resolve_export_dtype(dtype: str, raw_config: dict) -> str:
    """``auto``: the checkpoint's float16/bfloat16, else float16 (as TensorRT-LLM's converter does)."""
    if dtype == "auto":
        stored = raw_config.get("dtype") or raw_config.get("torch_dtype")
        return stored if stored in ("float16", "bfloat16") else "float16"
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use auto or one of {', '.join(DTYPES)}")
    return dtype


def write_checkpoint_from_hf(source: SourceModel, out_dir: str | Path, dtype: str, mapping: Mapping,
                             notes: list[str] | None = None, progress=None) -> Path:
    """Read the checkpoint's tensors and write the TensorRT-LLM checkpoint into the existing ``out_dir``."""
    config, tensors = load_checkpoint(source.path)
    meta = {"source": str(source.path.absolute()), "source_architecture": source.architecture,
            "source_model_type": config.model_type, "notes": list(notes or [])}
    return write_trtllm_checkpoint(config, tensors, out_dir, mapping, dtype, source=meta, progress=progress)


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """A checkpoint export that passed every check (:func:`plan_export`); ``write`` performs it."""

    source: SourceModel
    notes: list[str]  # how a non-Llama checkpoint was mapped onto LlamaForCausalLM
    mapping: Mapping
    dtype: str  # resolved: float16, bfloat16 or float32

    def write(self, out_dir: str | Path, progress: bool = False) -> Path:
        """Write the TensorRT-LLM checkpoint into the existing ``out_dir``; ``progress``: a bar
        of the rank files on stderr."""
        bar = None
        if progress:
            def bar(it, total):  # noqa: E306
                return tqdm(it, total=total, desc="writing ranks", unit="rank", file=sys.stderr)
        return write_checkpoint_from_hf(self.source, out_dir, self.dtype, self.mapping, self.notes, progress=bar)


def plan_export(model_dir: str | Path, *, dtype: str = "auto", tp: int = 1, pp: int = 1,
                sink_engine: bool = True) -> ExportPlan:
    """Everything a checkpoint export can refuse, checked before anything is written: the Hugging
    Face directory, (with ``sink_engine``) whether a StreamingLLM engine runs it exactly, the
    tp/pp split and the dtype (``auto`` resolved)."""
    source = read_source(model_dir)
    notes = check_sink_engine(source) if sink_engine else []
    mapping = Mapping(tp=tp, pp=pp)
    check_mapping(source.config, mapping)
    return ExportPlan(source=source, notes=notes, mapping=mapping, dtype=resolve_export_dtype(dtype, source.raw))


def export_checkpoint(model_dir: str | Path, output_dir: str | Path, *, dtype: str = "auto", tp: int = 1,
                      pp: int = 1, sink_engine: bool = True, overwrite: bool = False,
                      progress: bool = False) -> ExportResult:
    """Convert a Hugging Face Llama-family checkpoint into a TensorRT-LLM checkpoint directory.

    Args:
        model_dir: Hugging Face directory (config.json + safetensors).
        output_dir: created whole (written beside it, then renamed); must not exist unless ``overwrite``.
        dtype: ``auto``, ``float16``, ``bfloat16`` or ``float32``.
        tp, pp: tensor- and pipeline-parallel sizes (``tp * pp`` rank files).
        sink_engine: refuse, with the reason, checkpoints a StreamingLLM engine cannot run exactly.
    """
    plan = plan_export(model_dir, dtype=dtype, tp=tp, pp=pp, sink_engine=sink_engine)
    with atomic_dir(output_dir, overwrite) as tmp:
        plan.write(tmp, progress=progress)
    return ExportResult(path=Path(output_dir), dtype=plan.dtype, mapping=plan.mapping, notes=plan.notes)


def load_trtllm_checkpoint(path: str | Path, dtype: torch.dtype | str = torch.float32,
                           device: torch.device | str = "cpu", backend: str = "auto"):
    """The eager runtime's :class:`~streaming_trt.runtime.model.Transformer` from a TensorRT-LLM checkpoint.

    Every tp/pp rank is merged back into Hugging Face names (duplicated KV heads and vocab padding
    removed) and handed to ``Transformer.from_state_dict``.
    """
    config, tensors = merge_trtllm_checkpoint(path)
    return Transformer.from_state_dict(config, tensors, dtype=dtype, device=device, backend=backend, source=str(path))
