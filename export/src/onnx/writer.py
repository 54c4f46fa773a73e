"""Writing an ONNX export: the checks, the traced graph, ``manifest.json`` and ``build_trt_engine.sh``."""
from __future__ import annotations

import copy
import dataclasses
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from streaming_trt.contract import Geometry, UserError
from streaming_trt.runtime.rope import inverse_frequencies

from ..files import atomic_dir, check_output_dir, save_tokenizer
from .graph import StreamingStep, io_names
from .triton_repos import write_triton_onnx_repos

FORMAT = "streaming-trt-onnx"
VERSION = 1
MODEL_FILE = "model.onnx"
OPSET = 20
DTYPES = {"float32": torch.float32, "float16": torch.float16}
TWO_GB = 2 * 10**9
OPTIMIZE = True


@dataclasses.dataclass(frozen=True)
class Profile:
    """TensorRT optimization-profile bounds (and what the runner feeds at most per call)."""

    max_batch: int = 8
    opt_batch: int = 1
    max_chunk: int = 512
    opt_chunk: int = 1


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: the ONNX export writes float32 or float16 (bfloat16 has no "
                        "onnxruntime CPU kernels and TensorRT builds it from float32 with --bf16)")


def check_export(model, geometry: Geometry, dtype: str, profile: Profile) -> None:
    """Refuse (UserError, with the reason) what the graph cannot honour."""
    check_dtype(dtype)
    c = model.config
    kind = (c.rope_scaling or {}).get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise UserError(f"rope type {kind!r} cannot be frozen into per-position inverse frequencies")
    for name, v in (("max batch", profile.max_batch), ("max chunk", profile.max_chunk),
                    ("opt batch", profile.opt_batch), ("opt chunk", profile.opt_chunk)):
        if not isinstance(v, int) or v < 1:
            raise UserError(f"{name} must be an integer >= 1, got {v!r}")
    if profile.opt_batch > profile.max_batch or profile.opt_chunk > profile.max_chunk:
        raise UserError("the optimal batch/chunk of the TensorRT profile must not exceed its maximum")
    if geometry.capacity + profile.max_chunk > 2**31 - 1:
        raise UserError("sink_tokens + window + max chunk must stay below 2**31 (TensorRT's int32 shapes)")


def trtexec_command(onnx_path: str, engine_path: str, config, capacity: int, dtype: str, profile: Profile) -> list[str]:
    """The ``trtexec`` command that builds a TensorRT engine from the exported graph, with one
    optimization profile: batch ``1..max_batch``, chunk ``1..max_chunk`` (opt: decode)."""
    h = config.rotary_dim // 2
    kv, d = config.num_kv_heads, config.head_dim

    def shapes(bt: int, n: int) -> str:
        items = [f"input_ids:{bt}x{n}", f"logits_index:{bt}x{n}", f"seen:{bt}", f"lengths:{bt}", f"sink_tokens:{bt}"]
        items += [f"{k}:{bt}x{n}x{h}" for k in ("cos_text", "sin_text", "cos_rank", "sin_rank")]
        items += [f"past_{kind}.{i}:{bt}x{kv}x{capacity}x{d}" for i in range(config.num_layers)
                  for kind in ("key", "value")]
        return ",".join(items)

    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
           f"--minShapes={shapes(1, 1)}", f"--optShapes={shapes(profile.opt_batch, profile.opt_chunk)}",
           f"--maxShapes={shapes(profile.max_batch, profile.max_chunk)}"]
    if dtype == "float16":
        cmd.append("--fp16")  # weights are float16 already; lets TensorRT pick float16 tactics
    return cmd


def _export_graph(model, geometry: Geometry, path: Path, dtype: torch.dtype, external: bool) -> None:
    c = model.config
    b, n, h = 2, 3, c.rotary_dim // 2
    dev = model.embed_tokens.weight.device
    ex = [torch.zeros(b, n, dtype=torch.int64, device=dev), torch.zeros(b, n, dtype=torch.int64, device=dev),
          torch.tensor([0, 5], device=dev), torch.tensor([3, 2], device=dev),
          torch.full((b,), geometry.sink_tokens, dtype=torch.int64, device=dev)]
    ex += [torch.zeros(b, n, h, device=dev) for _ in range(4)]
    ex += [torch.zeros(b, c.num_kv_heads, geometry.capacity, c.head_dim, dtype=dtype, device=dev)
           for _ in range(2 * c.num_layers)]
    B, N, M = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("chunk", min=1, max=2**20), \
        torch.export.Dim("logit_rows", min=1, max=2**20)
    cap = torch.export.Dim("capacity", min=2, max=2**30)
    dyn = [{0: B, 1: N}, {0: B, 1: M}, {0: B}, {0: B}, {0: B}] + [{0: B, 1: N}] * 4 + [{0: B, 2: cap}] * (2 * c.num_layers)
    inputs, outputs = io_names(c.num_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(StreamingStep(model), tuple(ex), dynamo=True, opset_version=OPSET, input_names=inputs,
                                 output_names=outputs, dynamic_shapes=(*dyn[:9], tuple(dyn[9:])), optimize=OPTIMIZE,
                                 verbose=False, report=False)
    prog.save(str(path), external_data=external)


def export_onnx(model, output: str | Path, sink_tokens: int, window: int, dtype: str = "float32",
                profile: Profile = Profile(), tokenizer_source: str | Path | None = None,
                triton: bool = True, overwrite: bool = False, source: str = "") -> Path:
    """Write ``output/``: ``model.onnx`` (+ ``model.onnx.data`` when over 2 GB), ``manifest.json``,
    ``build_trt_engine.sh`` (trtexec), ``tokenizer/`` (when ``tokenizer_source`` has one) and
    ``triton/`` (onnxruntime- and tensorrt-backend repositories). Created whole or not at all.

    Args:
        model: a :class:`streaming_trt.runtime.model.Transformer` (any dtype; cast to ``dtype``).
        sink_tokens, window: S and W, baked into the graph (C = S + W is the caches' slot axis).
        dtype: ``float32`` or ``float16`` (weights and caches; logits are always float32).
    """
    geometry = Geometry(sink_tokens, window)
    check_export(model, geometry, dtype, profile)
    output = check_output_dir(output, overwrite).absolute()
    tdtype = DTYPES[dtype]
    graph_model = model if model.dtype == tdtype else copy.deepcopy(model).to(tdtype)
    c, capacity = model.config, geometry.capacity
    params = sum(p.numel() for p in model.parameters())
    external = params * torch.empty((), dtype=tdtype).element_size() > TWO_GB
    with atomic_dir(output, overwrite) as tmp:
        t0 = time.perf_counter()
        say(f"exporting the streaming step ({c.num_layers} layers, {dtype}, S={sink_tokens}, W={window}) "
            f"with torch.onnx.export (dynamo, opset {OPSET})")
        with torch.no_grad():
            _export_graph(graph_model, geometry, tmp / MODEL_FILE, tdtype, external)
        say(f"graph written in {time.perf_counter() - t0:.1f} s")
        tok_dir = save_tokenizer(tokenizer_source, tmp / "tokenizer")
        cmd = trtexec_command(MODEL_FILE, "model.plan", c, capacity, dtype, profile)
        (tmp / "build_trt_engine.sh").write_text(
            "#!/bin/sh\n# Build a TensorRT engine from the streaming step (TensorRT 10.x, NVIDIA GPU).\n"
            "# One optimization profile: batch 1..{0}, chunk 1..{1}.\nset -e\ncd \"$(dirname \"$0\")\"\n{2}\n".format(
                profile.max_batch, profile.max_chunk, " \\\n    ".join(shlex.quote(x) for x in cmd)))
        (tmp / "build_trt_engine.sh").chmod(0o755)
        inputs, outputs = io_names(c.num_layers)
        specs = _io_specs(c, capacity, dtype)
        manifest = {
            "format": FORMAT, "version": VERSION, "model_file": MODEL_FILE,
            "external_data": "model.onnx.data" if external else None, "opset": OPSET,
            "dtype": dtype, "sink_tokens": sink_tokens, "window": window, "capacity": capacity,
            "source": str(source), "config": c.to_hf_dict(),
            "rotary": {"inv_freq": [float(x) for x in inverse_frequencies(c).tolist()], "rotary_dim": c.rotary_dim,
                       "how": "cos/sin inputs are float32 cos/sin of (position * inv_freq) formed in float64 and "
                              "reduced mod 2*pi; *_text at t = seen + i, *_rank at min(t, capacity - 1)"},
            "inputs": specs[0], "outputs": specs[1],
            "input_names": inputs, "output_names": outputs,
            "state": [{"input": f"past_{k}.{i}", "output": f"present_{k}.{i}"}
                      for i in range(c.num_layers) for k in ("key", "value")],
            "profile": dataclasses.asdict(profile),
            "tokenizer": "tokenizer" if tok_dir else None,
            "trtexec": cmd,
            "drive": ("per call: seen = tokens stored per stream, lengths = valid rows of the chunk, cos/sin from "
                      "rotary_inputs(inv_freq, seen, n, geometry), logits_index = rows whose logits you want, past_* = "
                      "the previous call's present_* (zeros at the start of a stream); then seen += lengths"
                      + (f"; a new stream starts with the model's sink token {c.sink_token_id} (config.sink_token_id), "
                         "fed once before its first tokens" if c.sink_token_id is not None else "")),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if triton:
            write_triton_onnx_repos(tmp / "triton", manifest, profile.max_batch)
    say(f"wrote {output}")
    return output


def say(message: str) -> None:
    print(f"[streaming-trt onnx] {message}", file=sys.stderr, flush=True)


def _io_specs(c, capacity: int, dtype: str):
    h = c.rotary_dim // 2
    cache = ["batch", c.num_kv_heads, capacity, c.head_dim]
    ins = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "chunk"]},
           {"name": "logits_index", "dtype": "int64", "shape": ["batch", "logit_rows"]},
           {"name": "seen", "dtype": "int64", "shape": ["batch"]},
           {"name": "lengths", "dtype": "int64", "shape": ["batch"]},
           {"name": "sink_tokens", "dtype": "int64", "shape": ["batch"]}]
    ins += [{"name": k, "dtype": "float32", "shape": ["batch", "chunk", h]}
            for k in ("cos_text", "sin_text", "cos_rank", "sin_rank")]
    ins += [{"name": f"past_{k}.{i}", "dtype": dtype, "shape": cache} for i in range(c.num_layers) for k in ("key", "value")]
    outs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "logit_rows", c.vocab_size]},
            {"name": "seen_out", "dtype": "int64", "shape": ["batch"]}]
    outs += [{"name": f"present_{k}.{i}", "dtype": dtype, "shape": cache} for i in range(c.num_layers)
             for k in ("key", "value")]
    return ins, outs
