"""Triton Inference Server repositories for an ONNX export: the onnxruntime and tensorrt backends,
every layer's caches held as implicit state by the sequence batcher."""
from __future__ import annotations

from pathlib import Path

from ..model_repository import write_model_repository

_TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}


def triton_config(manifest: dict, backend: str, max_batch: int) -> str:
    """config.pbtxt text for the ``onnxruntime`` or ``tensorrt`` backend: the sequence batcher
    holds every layer's caches as implicit state, one batch slot per conversation (``direct``); a
    client sends input_ids, logits_index, seen, lengths, sink_tokens and the four cos/sin tensors
    (it knows its own position; ``seen_out`` echoes the next one)."""
    name = "streaming_onnx" if backend == "onnxruntime" else "streaming_trt_plan"
    lines = [f'name: "{name}"', f'backend: "{backend}"', f"max_batch_size: {max_batch}",
             f'default_model_filename: "{"model.onnx" if backend == "onnxruntime" else "model.plan"}"']
    state_inputs = {s["input"] for s in manifest["state"]}
    state_outputs = {s["output"] for s in manifest["state"]}

    def tensor(spec):
        dims = [str(-1 if isinstance(x, str) else x) for x in spec["shape"][1:]]  # batch dim is implicit
        if not dims:  # one value per stream: Triton needs dims, the graph takes [batch]
            return (f'  {{ name: "{spec["name"]}" data_type: {_TRITON_TYPES[spec["dtype"]]} dims: [ 1 ] '
                    'reshape: { shape: [ ] } }')
        return f'  {{ name: "{spec["name"]}" data_type: {_TRITON_TYPES[spec["dtype"]]} dims: [ {", ".join(dims)} ] }}'

    ins = [s for s in manifest["inputs"] if s["name"] not in state_inputs]
    outs = [s for s in manifest["outputs"] if s["name"] not in state_outputs]
    lines.append("input [\n" + ",\n".join(tensor(s) for s in ins) + "\n]")
    lines.append("output [\n" + ",\n".join(tensor(s) for s in outs) + "\n]")
    specs = {s["name"]: s for s in manifest["inputs"]}
    states = []
    for st in manifest["state"]:
        spec = specs[st["input"]]
        dims = [str(x) for x in spec["shape"][1:]]
        init = ('initial_state: { data_type: %s dims: [ %s ] zero_data: true name: "zeros" }'
                % (_TRITON_TYPES[spec["dtype"]], ", ".join(dims)))
        states.append(f'    {{ input_name: "{st["input"]}" output_name: "{st["output"]}" '
                      f'data_type: {_TRITON_TYPES[spec["dtype"]]} dims: [ {", ".join(dims)} ] {init} }}')
    lines.append(
        "sequence_batching {\n"
        "  max_sequence_idle_microseconds: 3600000000\n"
        "  direct { }\n"
        "  state [\n" + ",\n".join(states) + "\n  ]\n}")
    # No control inputs: the graph has none, and the state is zeroed by initial_state at START.
    kind = "KIND_GPU" if backend == "tensorrt" else "KIND_AUTO"
    lines.append(f'instance_group [ {{ kind: {kind} count: 1 }} ]')
    return "\n".join(lines) + "\n"


def write_triton_onnx_repos(root: Path, manifest: dict, max_batch: int) -> None:
    """``root/onnxruntime/streaming_onnx/{config.pbtxt,1/}`` and ``root/tensorrt/streaming_trt_plan/...``."""
    files = {}
    for backend, name in (("onnxruntime", "streaming_onnx"), ("tensorrt", "streaming_trt_plan")):
        files[f"{backend}/{name}/config.pbtxt"] = triton_config(manifest, backend, max_batch)
        what = ("copy or link ../../../model.onnx (and model.onnx.data) here" if backend == "onnxruntime"
                else "put the engine built by ../../../build_trt_engine.sh (model.plan) here")
        files[f"{backend}/{name}/1/README.txt"] = what + "\n"
    write_model_repository(root, files)
